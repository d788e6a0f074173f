"""Do the models draw the digits they are asked for? A digit classifier trained on the real 8x8
digits reads generated images downscaled to 8x8; prints per-class accuracy per model, and images/s.

    python -m bench.quality [--config models/default/models.toml] [--per-class 10] [--seed 0]

Class models get `per-class` images of every digit (seeds seed, seed + 1, ...); text models get the
same number per digit, cycling through EVAL_CAPTIONS. Needs scikit-learn (the dev or train extra).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from models.config import DEFAULT_CONFIG, ModelSpec, load_config
from models.runner import ImageParams, ModelRunner
from models.train.data import DIGIT_WORDS, load_digit_images, to_digit_pixels

# {w}: the digit as a word, {n}: as a numeral. Some wordings are training captions, some are not.
EVAL_CAPTIONS = ("a handwritten {w}", "number {n}", "{w}", "the digit {n}", "a picture of the digit {w}")


def train_classifier(seed: int = 0):
    """An SVC on half of the real digits -> (classifier, accuracy on the other half, the same half's
    accuracy after the 8 -> 64 -> 8 px round trip the models' training images went through)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(index, test_size=0.5, random_state=seed, stratify=digits.target)
    clf = SVC(gamma=0.001).fit(digits.data[train_idx], digits.target[train_idx])
    held_out = clf.score(digits.data[test_idx], digits.target[test_idx])
    images, _ = load_digit_images()
    round_trip = to_digit_pixels(images[test_idx].add(1).mul(0.5)).numpy()
    return clf, held_out, clf.score(round_trip, digits.target[test_idx])


def conditions_for(runner: ModelRunner, per_class: int) -> tuple[list[int | str], list[int]]:
    """-> (one condition per image, the digit each should show), digits 0..9 in turn."""
    conditions, digits = [], []
    for i in range(per_class):
        for d in range(10):
            if runner.conditioning == "class":
                conditions.append(d)
            else:
                caption = EVAL_CAPTIONS[(i + d) % len(EVAL_CAPTIONS)]
                conditions.append(caption.format(w=DIGIT_WORDS[d], n=d))
            digits.append(d)
    return conditions, digits


def params_for(spec: ModelSpec, seeds: list[int]) -> list[ImageParams]:
    d = spec.defaults
    return [ImageParams(s, d.cfg, d.top_k, d.top_p, d.temperature) for s in seeds]


def generate(runner: ModelRunner, conditions: list, seed: int, batch_size: int = 50) -> torch.Tensor:
    """Image i uses seed + i. -> (N, 3, H, W) in [0, 1]."""
    out = []
    for start in range(0, len(conditions), batch_size):
        part = conditions[start : start + batch_size]
        seeds = list(range(seed + start, seed + start + len(part)))
        out.append(runner.generate(part, params_for(runner.spec, seeds)).images)
    return torch.cat(out)


def classify(clf, images: torch.Tensor) -> np.ndarray:
    return clf.predict(to_digit_pixels(images).numpy())


def images_per_second(runner: ModelRunner, batch: int, repeats: int = 3) -> float:
    """Best of `repeats` timed batches after a warm-up (the machine is shared)."""
    conditions, _ = conditions_for(runner, 2)
    conditions = (conditions * batch)[:batch]
    params = params_for(runner.spec, list(range(batch)))
    runner.generate(conditions, params)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.generate(conditions, params)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speed", action="store_true", help="skip the images/s measurement")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    clf, held_out, round_trip = train_classifier()
    print(
        f"classifier (SVC on 899 real digits): {held_out:.1%} on the 898 held out, "
        f"{round_trip:.1%} on them after the 8->64->8 px round trip"
    )
    header = f"{'model':<22}" + "".join(f"{d:>5}" for d in range(10)) + f"{'all':>7}"
    header += "" if args.no_speed else f"{'img/s b1':>10}{'img/s b16':>11}"
    print(header)
    for spec in load_config(args.config):
        runner = ModelRunner(spec)
        conditions, digits = conditions_for(runner, args.per_class)
        predicted = classify(clf, generate(runner, conditions, args.seed))
        digits = np.array(digits)
        per_class = [(predicted[digits == d] == d).mean() for d in range(10)]
        row = f"{spec.name:<22}" + "".join(f"{a:>5.0%}" for a in per_class)
        row += f"{(predicted == digits).mean():>7.1%}"
        if not args.no_speed:
            row += f"{images_per_second(runner, 1):>10.1f}{images_per_second(runner, 16):>11.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
