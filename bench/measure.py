"""What this machine can do, measured in the same run as the thing being benchmarked."""

from __future__ import annotations

import time

import numpy as np
import torch


def matmul_peak(shapes) -> tuple[float, tuple]:
    best = (0.0, None)
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps = max(3, int(2e10 / (2 * m * k * n)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        rate = 2 * m * k * n * reps / (time.perf_counter() - t0)
        best = max(best, (rate, (m, k, n)))
    return best


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Best of `repeats` runs after a warm-up: on a shared 2-core machine the fastest run is the one
    least disturbed by other work, and the best estimate of what the code itself costs. warmup=False
    for runs of tens of seconds whose parts have already run at these shapes."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(repeats: int = 7) -> float:
    """Memory read bandwidth (bytes/s): best of `repeats` sums over 1 GiB, far beyond the caches."""
    x = torch.ones(2**28)
    x.sum()
    return x.nbytes / timed(x.sum, repeats)


def timed_alternating(fns, repeats: int, warmup: bool = True) -> list[float]:
    """Best of `repeats` runs of each of `fns`, run in turn (a, b, a, b, ...) after a warm-up of each.
    Two implementations compared on a shared machine then see the same neighbours' load over the
    same seconds, instead of one of them getting a quiet minute and the other a busy one."""
    if warmup:
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def paired_speedup(base: np.ndarray, other: np.ndarray, draws: int = 2000) -> tuple[float, float, float]:
    """base, other: seconds of the same images, paired -> speed-up sum(base) / sum(other) with a 95 %
    bootstrap interval over the pairs (seeded: the same figures from the same times)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(base), size=(draws, len(base)))
    ratios = base[picks].sum(1) / other[picks].sum(1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(base.sum() / other.sum()), float(low), float(high)
