"""Process- and thread-level settings for running models (the CPU allocator, a thread's CUDA device),
and a clock for timing device work."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import numpy as np
import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_tuned = False


def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed blocks to the OS.

    Every scale allocates activations of tens of MB; by default glibc serves each from a fresh
    mmap and unmaps it on free, so the next one page-faults all of it in again (measured: about
    7 % of a batch-16 VAR generation on CPU). Keeping freed memory in the heap lets the next scale
    reuse it, as jemalloc or tcmalloc would. That holds for glibc's main arena only: every other
    thread would get an arena of 64 MB heaps that maps and unmaps those blocks again (measured: a
    VAR batch ran at 3.2 images/s in a worker thread against 5.2 in the main thread), so all
    threads share the main arena. Call it before starting threads that run models: a thread
    picks its arena at its first allocation. Returns whether the setting took (glibc only)."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = all(
            libc.mallopt(option, value) == 1
            for option, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_ARENA_MAX, 1))
        )
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


def use_device(device: str | torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (nothing for a CPU or an unnumbered
    "cuda"). Triton launches its kernels on the calling thread's current device and stream, and
    torch's own kernels follow their tensors: a thread serving cuda:1 from a process whose current
    device is cuda:0 would launch Triton kernels on cuda:0 with cuda:1's pointers."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)


def device_clock(device: torch.device) -> float:
    """time.perf_counter() once the work queued on `device` is done (CUDA kernels run
    asynchronously: without the wait a timing would count their launches only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def host_longs(values, device: torch.device) -> torch.Tensor:
    """A long tensor of host ints (a list, or a list of equal lists) on `device`, through numpy:
    torch.tensor of a 40-int list took 15 us on this CPU, this 2.5, and a decode pass builds
    several."""
    t = torch.from_numpy(np.asarray(values, dtype=np.int64))
    return t if t.device == device else t.to(device)
