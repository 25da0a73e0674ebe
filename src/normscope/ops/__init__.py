"""normscope's normalization ops: the custom ops, their backends and the public fp32 reference.

``normscope.ops.reference`` is the plain-PyTorch oracle; ``normscope.ops.core`` registers the
``normscope::norm_fwd`` / ``normscope::norm_bwd`` custom ops; ``normscope.ops.dispatch`` chooses a
backend (``triton``, ``cpu``, ``reference``). Backends are imported lazily.
"""

from normscope.ops import reference  # noqa: F401
from normscope.ops._sharding import register as register_dtensor_sharding  # noqa: F401
