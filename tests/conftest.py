import os

import torch

# Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable
# must be set before triton (and normscope's Triton backend) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CUDA suite runs on GPU machines (benchmarks/gpu_suite.sh); without a device it is not
    # collected at all rather than reported as skipped.
    collect_ignore = ["cuda"]
