"""Linear layers for decode steps, where up to a few hundred rows meet a large weight matrix.

On CPU, `F.linear(x, W)` (x @ W.T) runs a GEMM kernel tuned for many rows: with 2-32 rows it
reached 8-83 GFLOP/s here, and one row goes to a single-threaded GEMV (13 GB/s of weights). The
same product computed weight-major, `W @ x.T` with x.T a column-major view, reached 28-126 GFLOP/s
(28 GB/s of weights at 2 rows, near this machine's read bandwidth) and stays ahead up to ~256
rows. CUDA and larger row counts keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_MAJOR_MAX_ROWS = 256


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def weight_major_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: (..., K), weight: (N, K) -> (..., N), as weight @ x.T."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if m == 1:
        rows = rows.repeat(2, 1)  # a second (ignored) column keeps it off the single-threaded GEMV
    # rows.T must be a column-major view (not a row-major copy) and the result is made row-major
    # again: the fast path depends on that layout (6 vs 25 GB/s measured for a (768, 2048) weight).
    out = (weight @ rows.T)[:, :m].T.contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.device.type == "cpu" and x.numel() <= WEIGHT_MAJOR_MAX_ROWS * x.shape[-1]:
        return weight_major_linear(x, weight, bias)
    return linear_reference(x, weight, bias)
