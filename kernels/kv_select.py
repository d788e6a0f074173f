"""kv_select: which candidates each segment of a ragged KV slab keeps, by a policy's priorities.

A segment's candidates are columns 0..M-1 (kernels/kv_merge.py: its stored keys, then the current
scale's), each with a tier and a key; a segment keeps its `keep` best valid columns, higher tier
first, then higher key, then the lower column (older first), so the choice is a function of the
segment's own numbers and never of its batch. The result lists the kept columns in ascending order
(the slab keeps position order), -1 past each segment's keep.

`select_columns_torch` is the reference and the path off the CPU (two stable sorts make the
lexicographic order, a third puts the kept columns back in order); `select_columns_cpu` runs
kernels/cpu/kv_select.c: a quickselect of the keep-th best over priorities packed into one integer,
then one scan in column order, with no sort. Both give the same columns exactly (the priorities
compare the same float32 keys, -0.0 equal to +0.0, NaN above everything).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native

MAX_COLUMNS, MAX_TIER = 65535, 65534  # the C kernel's packing: 16 bits of column and of tier + 1


def select_columns_torch(
    tier: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """tier, key: (G, M) priorities (higher first: tier, then key, then the lower column); valid:
    (G, M) bool; keep: (G,) long, how many each segment keeps (<= its valid columns) -> (G, max
    keep) long: the kept columns in ascending order, -1 past each segment's keep."""
    G, M = tier.shape
    width = int(keep.max()) if G else 0
    if width == 0:
        return torch.full((G, 0), -1, dtype=torch.long, device=tier.device)
    # two stable sorts make a lexicographic order: by key, then by tier (stable: ties stay by index)
    order = torch.sort(key.masked_fill(~valid, -torch.inf), dim=1, descending=True, stable=True).indices
    t = tier.masked_fill(~valid, -1).gather(1, order)
    order = order.gather(1, torch.sort(t, dim=1, descending=True, stable=True).indices)[:, :width]
    taken = torch.arange(width, device=keep.device)[None, :] < keep[:, None]
    cols = torch.sort(order.masked_fill(~taken, M), dim=1).values
    return cols.masked_fill(cols == M, -1)


@functools.cache
def _c_kernel():
    """kernels/cpu/kv_select.c's entry point, or None where it cannot be built."""
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return native.function(
        "kv_select",
        "varserve_kv_select",
        *(ptr, ptr, ptr, long, long),  # tier, key, valid; G, M
        *(ptr, ptr, long),  # keep, cols, W
        restype=ctypes.c_int,
    )


def select_columns_cpu(
    tier: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """select_columns_torch in one C call (CPU tensors, float32 keys, tiers in [0, MAX_TIER])."""
    G, M = tier.shape
    assert key.shape == valid.shape == (G, M) and keep.shape == (G,), "tier, key, valid: (G, M); keep: (G,)"
    assert key.dtype == torch.float32, "the kernel compares float32 keys"
    width = int(keep.max()) if G else 0
    cols = torch.empty(G, width, dtype=torch.long)
    if width == 0:
        return cols
    tier, keep = (t.long().contiguous() for t in (tier, keep))
    key = key.contiguous()
    valid = valid.to(torch.uint8).contiguous()
    rc = _c_kernel()(
        tier.data_ptr(), key.data_ptr(), valid.data_ptr(), G, M, keep.data_ptr(), cols.data_ptr(), width
    )
    if rc == 2:
        raise ValueError(
            f"kv_select: a segment keeps more than its valid candidates, or a tier outside [0, {MAX_TIER}]"
        )
    if rc != 0:
        raise MemoryError("kv_select.c: no memory for a segment's buffer")
    return cols


def select_columns(
    tier: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """See select_columns_torch. The C kernel on CPU where it builds and the keys are float32 (it
    compares them as such), else the reference."""
    on_cpu = all(t.device.type == "cpu" for t in (tier, key, valid, keep))
    if on_cpu and key.dtype == torch.float32 and tier.shape[1] <= MAX_COLUMNS and _c_kernel() is not None:
        if not bool((((tier < 0) | (tier > MAX_TIER)) & valid).any()):  # else the packing cannot hold them
            return select_columns_cpu(tier, key, valid, keep)
    return select_columns_torch(tier, key, valid, keep)
