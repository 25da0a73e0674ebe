"""Exception classes raised by normscope's ops and modules for invalid arguments.

Each class derives from the built-in exception normscope has always raised *and* from the class
torch's own ``layer_norm`` / ``rms_norm`` raise for the same misuse, so code written for either
catches them:

======================  =====================================  ==============================
class                   bases                                  raised for
======================  =====================================  ==============================
:class:`ShapeError`     ``ValueError``, ``RuntimeError``       ``normalized_shape`` vs input,
                                                               weight / bias / residual / mask
                                                               shapes
:class:`DtypeError`     ``TypeError``, ``NotImplementedError``  unsupported input, weight,
                        (a ``RuntimeError``)                   bias, residual or mask dtype
:class:`DeviceError`    ``ValueError``, ``RuntimeError``       tensors on different devices,
                                                               a backend given the wrong device
======================  =====================================  ==============================

All three also derive from :class:`NormscopeError`. Messages keep torch's wording where torch has
one (``"Given normalized_shape=[4], expected input with shape [*, 4], but got input of size[2, 3,
8]"``), so a ``pytest.raises(RuntimeError, match=...)`` written against torch passes against
normscope.
"""

from __future__ import annotations

__all__ = ["NormscopeError", "ShapeError", "DtypeError", "DeviceError"]


class NormscopeError(Exception):
    """Base class of normscope's argument errors."""


class ShapeError(NormscopeError, ValueError, RuntimeError):
    """A shape that does not fit (torch raises ``RuntimeError`` for these)."""


class DtypeError(NormscopeError, TypeError, NotImplementedError):
    """A dtype normscope does not support (torch raises ``NotImplementedError`` for an input dtype
    its kernels lack and ``RuntimeError`` for a parameter dtype they refuse)."""


class DeviceError(NormscopeError, ValueError, RuntimeError):
    """Tensors on different devices, or a backend asked to run on a device it cannot (torch raises
    ``RuntimeError``)."""
