import os

import torch

# Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable
# must be set before triton (and normscope's Triton backend) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
