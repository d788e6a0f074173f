"""What this machine can do, measured in the same run as the thing being benchmarked."""

from __future__ import annotations

import statistics
import time

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


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth() -> float:
    x = torch.ones(2**28)  # 1 GiB of float32
    x.sum()
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        x.sum()
    return x.nbytes * reps / (time.perf_counter() - t0)
