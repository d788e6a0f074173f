"""Speculative decoding on the bundled next-token models: passes, speed and quality per method.

    python -m bench.speculative [--per-class 12] [--latency-images 3] [--window 16] [--threads 1]

Per model (llamagen-shapes c2i, llamagen-shapes-t2i), at the model's sampling defaults:
1. the measured cost curve: one verification pass of a window of L tokens over the rows of one
   guided image (2) and of eight (16), against L = 1;
2. per method (none, sjd, scd, gsd at a fixed window; scd and gsd at "auto"): forward passes per
   image, latency per image at batch 1 (images one at a time), images/s at batch 1 and 8, over
   `--rounds` rounds of every method in turn (the machine is shared: the median, and the speed-up
   over plain decoding paired within each round, with its range);
3. quality: `per-class` images of every shape per method (none, sjd, scd, gsd: auto samples as its
   method does), read by bench/quality.py's classifier
   (the shape, and for the text model the colour, asked for), and the total-variation distance
   between the method's pooled token histogram and plain decoding's, beside the same distance
   between two plain runs on other seeds (the noise floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from bench import quality
from models.config import DEFAULT_CONFIG, load_config
from models.llamagen.speculative import WINDOWS, AutoWindow
from models.runner import load_runner
from models.settings import Speculative

MODELS = ("llamagen-shapes", "llamagen-shapes-t2i")


def methods(window: int) -> list[tuple[str, Speculative]]:
    return [
        ("none", Speculative()),
        (f"sjd w{window}", Speculative("sjd", window)),
        (f"scd w{window}", Speculative("scd", window)),
        (f"gsd w{window}", Speculative("gsd", window)),
        ("scd auto", Speculative("scd", "auto")),
        ("gsd auto", Speculative("gsd", "auto")),
    ]


def params(runner, seeds: list[int], spec: Speculative):
    return [dataclasses.replace(p, speculative=spec) for p in quality.params_for(runner.spec, seeds)]


def run(runner, conditions: list, seed: int, spec: Speculative, batch: int):
    """-> (images, tokens, forward passes per image, seconds)."""
    images, tokens, passes = [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(conditions), batch):
        part = conditions[start : start + batch]
        out = runner.generate(part, params(runner, list(range(seed + start, seed + start + len(part))), spec))
        images.append(out.images)
        tokens.append(out.tokens)
        passes += out.image_stats.forward_passes
    return torch.cat(images), torch.cat(tokens), passes, time.perf_counter() - t0


def tv_distance(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Total variation between the pooled token histograms of two sets of images."""
    pa = torch.bincount(a.flatten(), minlength=vocab).double()
    pb = torch.bincount(b.flatten(), minlength=vocab).double()
    return float((pa / pa.sum() - pb / pb.sum()).abs().sum() / 2)


def cost_table(runner) -> None:
    cost = AutoWindow(runner.model)
    print(
        f"\n{runner.spec.name}: one verification pass of L tokens, time / time of L = 1 (median of 7 interleaved rounds)"
    )
    print("| rows | " + " | ".join(f"L={L}" for L in WINDOWS) + " | L=1 ms |")
    print("|---" * (len(WINDOWS) + 2) + "|")
    for rows in (2, 16):
        c = {L: cost.pass_seconds(rows, L) for L in WINDOWS}
        ratios = " | ".join(f"{c[L] / c[1]:.2f}" for L in WINDOWS)
        print(f"| {rows} | {ratios} | {c[1] * 1e3:.1f} |")


def speed_table(runner, window: int, latency_images: int, rounds: int) -> None:
    """Every method once per round, in turn, `rounds` rounds after a warm-up of each: a neighbour's
    burst then slows one round of every method rather than one method. Speed-ups are the median
    over rounds of the time of `none` in that round over the method's (paired), with their range."""
    conditions, _ = quality.conditions_for(runner, 1)
    one = conditions[:latency_images]
    eight = (conditions * 8)[:8]
    table = methods(window)
    for _, spec in table:  # warm-up (and the auto calibration and cost curve)
        run(runner, one[:1], 100, spec, 1)
        run(runner, eight, 200, spec, 8)
    times = {name: ([], []) for name, _ in table}
    passes = {}
    for _ in range(rounds):
        for name, spec in table:
            b1 = run(runner, one, 100, spec, 1)
            b8 = run(runner, eight, 200, spec, 8)
            times[name][0].append(b1[3] / len(one))
            times[name][1].append(b8[3] / 8)
            passes[name] = (np.mean(b1[2]), np.mean(b8[2]))
    print(
        f"\n{runner.spec.name}: speed (images at the model's defaults; {rounds} rounds, methods in turn; "
        "median, speed-up = none's time / the method's in the same round, median [min, max])"
    )
    print(
        "| method | passes/image b1 | b8 | latency/image b1 (s) | images/s b1 | images/s b8 | speed-up b1 | speed-up b8 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = times["none"]
    for name, _ in table:
        b1, b8 = (float(np.median(t)) for t in times[name])
        cells = []
        for i in (0, 1):
            ratio = np.array(base[i]) / np.array(times[name][i])
            cells.append(f"{np.median(ratio):.2f}x [{ratio.min():.2f}, {ratio.max():.2f}]")
        print(
            f"| {name} | {passes[name][0]:.1f} | {passes[name][1]:.1f} | {b1:.3f} | {1 / b1:.2f} | {1 / b8:.2f} | {cells[0]} | {cells[1]} |"
        )


def quality_table(runner, clf, window: int, per_class: int) -> None:
    conditions, want = quality.conditions_for(runner, per_class)
    vocab = runner.model.config.vocab_size
    text = runner.conditioning == "text"
    print(f"\n{runner.spec.name}: quality, {len(conditions)} images per method (batch 8)")
    head = "| method | passes/image | shape acc | " + ("colour acc | " if text else "")
    print(head + "token TV vs none | noise floor (none vs none, other seeds) |")
    print("|---" * (5 + text) + "|")
    plain_tokens = None
    for name, spec in methods(window)[:4]:  # auto samples as its method does
        images, tokens, passes, _ = run(runner, conditions, 0, spec, 8)
        predicted = quality.predict(clf, images)
        acc = quality.accuracy(predicted, want, "shape")
        colour = f"{quality.accuracy(predicted, want, 'colour'):.3f} | " if text else ""
        if plain_tokens is None:
            plain_tokens = tokens
            other = run(runner, conditions, 10_000, spec, 8)[1]
            floor = f"{tv_distance(tokens, other, vocab):.4f}"
            tv = "0"
        else:
            tv, floor = f"{tv_distance(tokens, plain_tokens, vocab):.4f}", ""
        print(f"| {name} | {np.mean(passes):.1f} | {acc:.3f} | {colour}{tv} | {floor} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=12, help="quality: images per shape and method")
    parser.add_argument("--latency-images", type=int, default=3, help="batch-1 images timed per method")
    parser.add_argument("--window", type=int, default=16, help="the fixed window of sjd, scd and gsd")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--no-quality", action="store_true", help="the cost curve and speed tables only")
    parser.add_argument("--rounds", type=int, default=5, help="speed: rounds of every method in turn")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the server takes every core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = {s.name: s for s in load_config(DEFAULT_CONFIG)}
    t0 = time.perf_counter()
    clf = None
    if not args.no_quality:
        clf, held_out = quality.train_classifier()
        print(
            f"classifier on held-out real shapes: shape {held_out['shape']:.3f}, colour {held_out['colour']:.3f}"
        )
    for name in args.models:
        runner = load_runner(specs[name])
        cost_table(runner)
        speed_table(runner, args.window, args.latency_images, args.rounds)
        if not args.no_quality:
            quality_table(runner, clf, args.window, args.per_class)
    print(f"\n(total {time.perf_counter() - t0:.0f} s, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
