"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen when a kernel is decorated, so the variable is set here, before any test module imports
kernels.scale_attention (and only here)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
