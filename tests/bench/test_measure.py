import numpy as np

from bench.measure import paired_speedup


def test_paired_speedup_is_the_ratio_of_summed_times_with_an_interval_around_it():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.08, 0.12, size=200)
    assert paired_speedup(base, base / 2) == (2.0, 2.0, 2.0)  # a constant ratio has no spread
    noisy = base * rng.uniform(0.8, 1.2, size=200)  # a method as fast as plain decoding, under noise
    ratio, low, high = paired_speedup(base, noisy)
    assert ratio == base.sum() / noisy.sum()
    assert low < ratio < high and low < 1.0 < high
    assert high - low < 0.06  # 200 pairs of +-20 % noise pin the speed-up to a few percent
    # few pairs, wide interval
    few = paired_speedup(base[:5], noisy[:5])
    assert few[2] - few[1] > high - low
