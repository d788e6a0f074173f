"""Linear layers for decode steps, where a few rows meet a large weight matrix.

On CPU, PyTorch's `F.linear` is MKL's SGEMM, which on this (AMD) machine reads the weights at
6-15 GB/s for one or two rows (a decode step at batch 1) and reaches 70-105 GFLOP/s for 32-64 rows:
it repacks the weight on every call, and its small-M paths are not tuned for this CPU. oneDNN with
a pre-reordered weight does better (23 GB/s, 185 GFLOP/s) but still not at the memory bandwidth.

So on a CPU with AVX-512 or AVX2 (`packing_pays`) the weights are packed once, after loading,
into panels of 16 output columns (`pack_weight`: (N, K) -> (N / 16, K, 16)) and multiplied by our
C kernel (kernels/cpu/linear.c), which streams them in address order, four panels at a time on
AVX-512. On 400 MB of GPT-B-shaped weights at 2 rows, beside a 50-55 GB/s read probe in the same
run: 49 GB/s (43 with two panels at a time, the tile before); 145 / 187 / 200 GFLOP/s at 8 / 32 /
64 rows; on an AVX2 host at 1 thread, 57-61 GFLOP/s at 32 rows, where MKL managed 33-55. A row's
result does not depend on the other rows of the call, so batching stays invisible in the numbers.

Models keep their published (N, K) weights until `pack_linear_weights` swaps them for panels in
place (same memory). `linear(x, weight)` dispatches on the weight it is given (a 3-D weight is in
panels), and our `Linear` module calls it, so a layer works before and after packing;
`pack_linear_weights` swaps any plain nn.Linear it packs for one (as gpt-fast's quantizer swaps
modules), so no module is left whose own forward fails. CUDA and other dtypes keep `F.linear`; CPU without a C compiler computes
weight-major (`weight_major_linear`).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native

PANEL = 16  # output columns per panel: one AVX-512 register of float32


@cache
def packing_pays() -> bool:
    """Whether this CPU has the vector units the panel kernel's register tiles are sized for:
    AVX-512, or AVX2 with FMA (kernels/cpu/linear.c picks the tile at compile time). Measured at 1
    thread on an AVX2-only host (AMD EPYC, 2 cores, loaded): 2304 x 768 at 2 rows 0.17 ms packed
    against 0.46 ms through MKL, 16384 x 768 at 32 rows 14 against 24 ms. (The AVX-512 tile alone,
    compiled for AVX2, spilled its 32 accumulators: 454 against 44 ms at 32 rows, which is why
    packing once waited for AVX-512.) Loaders pack only where it pays; the kernel stays right
    everywhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags or (" avx2" in flags and " fma" in flags)


def _kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return native.function("linear", "varserve_linear_panels", ptr, ptr, ptr, long, long, long)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.shape[0] % PANEL == 0
        and native.load("linear") is not None
    )


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == 3


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> (N / 16, K, 16) panels, or the weight itself where packing does not apply."""
    if not can_pack(weight):
        return weight
    N, K = weight.shape
    return weight.detach().view(N // PANEL, PANEL, K).transpose(1, 2).contiguous()


def unpack_weight(panels: torch.Tensor) -> torch.Tensor:
    """(N / 16, K, 16) panels -> the (N, K) weight."""
    P, K, _ = panels.shape
    return panels.transpose(1, 2).reshape(P * PANEL, K)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward is `linear`, so it runs with
    its weight as published or packed into panels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def pack_linear_weights(module: nn.Module) -> int:
    """Packs the weight of every nn.Linear under `module` where packing applies -> how many.

    A plain nn.Linear is swapped for our `Linear` holding the same parameters, so `layer(x)` keeps
    working with the packed weight."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and can_pack(child.weight)
    ]
    for parent, name, child in targets:
        weight = nn.Parameter(pack_weight(child.weight), requires_grad=False)
        if type(child) is not Linear:
            child = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            child.bias = getattr(parent, name).bias
            setattr(parent, name, child)
        child.weight = weight
    return len(targets)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, unpack_weight(weight) if is_packed(weight) else weight, bias)


# Without our kernel (no C compiler), `W @ x.T` with x.T a column-major view still beats F.linear
# for up to a few hundred rows on CPU: 28-35 GB/s at 2 rows where MKL's x @ W.T managed 6-9.
WEIGHT_MAJOR_MAX_ROWS = 256


def weight_major_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: (..., K), weight: (N, K) -> (..., N), as weight @ x.T."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if m == 1:
        rows = rows.repeat(2, 1)  # a second (ignored) column keeps MKL off its single-threaded GEMV
    out = (weight @ rows.T)[:, :m].T.contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., K), weight: (N, K) or packed (N / 16, K, 16) -> (..., N)."""
    if not is_packed(weight):
        if x.device.type == "cpu" and x.numel() <= WEIGHT_MAJOR_MAX_ROWS * x.shape[-1]:
            return weight_major_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    P, K, _ = weight.shape
    N = P * PANEL
    rows = x.reshape(-1, K).contiguous()  # a view for the usual contiguous x
    if rows.dtype != torch.float32 or rows.device.type != "cpu":
        raise TypeError(f"packed linear takes float32 CPU inputs, got {rows.dtype} on {rows.device}")
    out = torch.empty(x.shape[:-1] + (N,), dtype=torch.float32)
    if rows.shape[0]:
        _kernel()(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], N, K)
    if bias is not None:
        out += bias
    return out


# MKL's SGEMM (PyTorch's F.linear on CPU) takes other kernels for calls of few rows, which sum a row
# in another order: measured here, calls of 1-3, 5-7 and 9-11 rows give other bits than the same
# rows inside a call of 64, while 4, 8 and 12 or more give the same.
INVARIANT_MIN_ROWS = 16


def batch_invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear whose rows have the same bits whatever other rows the call holds, so that an image
    computed alone equals the same image in a batch: x (..., K), weight (N, K) -> (..., N). On CPU a
    call of fewer than INVARIANT_MIN_ROWS rows is padded with zero rows to that many (a VAR's first
    scale has one token a row, its class modulation one row an image); larger calls are F.linear's."""
    rows = x.reshape(-1, x.shape[-1])
    M = rows.shape[0]
    if x.device.type != "cpu" or M == 0 or M >= INVARIANT_MIN_ROWS:
        return F.linear(x, weight, bias)
    padded = rows.new_zeros(INVARIANT_MIN_ROWS, rows.shape[1])
    padded[:M] = rows
    return F.linear(padded, weight, bias)[:M].reshape(*x.shape[:-1], weight.shape[0])


class BatchInvariantLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) through `batch_invariant_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_invariant_linear(x, self.weight, self.bias)
