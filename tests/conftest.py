import os

import torch

# The Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
# the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
