"""What the compressed KV cache costs in fidelity and buys in bytes and speed (issue 14), on the
bundled `var-shapes` model (680 tokens, ten scales, the bundled calibrated KV profile):

- cells: `full` once, then window, snapkv, hack, scalekv, heatkv, valuekv at each budget (100, 50, 25, 10,
  5 %); every cell makes the same `--images` images (image i: class i mod 8, seed `--seed` + i,
  the model's default sampling), compared image by image with `full`'s;
- bytes: stored, working and full KV bytes per image from BatchResult (at the fidelity batch, 16,
  and the working peak also at batch 1), and their ratios to full;
- speed: images/s at batch 1 (`--speed-images` single-image runs, default 16, per round) and
  batch 16 (`--speed-batches` batches per round, default 2), whole images (VQ-VAE decode included) and the engine alone
  (less BatchResult.decode_s), over `--rounds` rounds; every batch is made by each cell in turn,
  full first, and a cell's speed against full is the ratio of the summed times of the pairs, with
  a 95 % bootstrap interval over them (bench/measure.py: paired_speedup);
- fidelity: token agreement with full per scale and overall, PSNR against full's image (8-bit, as
  served; an identical image is capped at 100 dB, so the mean is also given over the images that
  differ, with the share identical), and the shape classifier's accuracy on the intended class
  (bench/quality.py) beside full's, with the paired difference and its standard error;
- without the model: KV bytes at batch 16 for the published VAR-d16 and VAR-d30 shapes at 256 px
  from each policy's plan (models/kv/policies.py), beside the papers' accounting.

    OMP_NUM_THREADS=1 python -m bench.kv_fidelity [--images 200] [--speed-images 16] [--speed-batches 2] [--rounds 3]
        [--policies window snapkv ...] [--budgets 100 50 25 10 5] [--merge off|on|both] [--no-speed]

One thread on a shared machine: on this 2-core VM with other work running, a batch of 16 took
7.5 s on one thread and 72 s on two (the OpenMP threads wait on each other when one is descheduled).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.measure import paired_speedup
from bench.quality import predict, train_classifier
from models.config import DEFAULT_CONFIG, load_config
from models.kv.compressed import slab_nbytes
from models.kv.policies import ScaleGeometry, policy
from models.kv.profile import KVProfile
from models.runner import Runner, load_runner
from models.settings import ImageSettings

COMPRESSING = ("window", "snapkv", "hack", "scalekv", "heatkv", "valuekv")
BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05)
PSNR_CAP = 100.0  # dB for an identical image: above any 8-bit difference (one level in one value: 89 dB)
BATCH = 16  # the fidelity runs' batch, and the larger speed batch
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# the published shapes: (depth, heads, head_dim); width = heads x 64 (VAR's depth-scaled width)
PUBLISHED = {"VAR-d16": (16, 16, 64), "VAR-d30": (30, 30, 64)}


@dataclass(frozen=True)
class Cell:
    policy: str
    budget: float
    merge: bool = False  # kv_merge: evicted keys folded into their nearest kept key

    @property
    def name(self) -> str:
        return self.policy + ("+merge" if self.merge else "")

    @property
    def label(self) -> str:
        return "full" if self.policy == "full" else f"{self.name} {self.budget:.0%}"


def cells_of(policies, budgets, merge: str = "off") -> list[Cell]:
    """full, then every policy at every budget, without merging, with it ("on": only with it, for
    the policies it applies to) or both."""
    mergeable = [p for p in policies if policy(p).evicts]
    plain = [Cell(p, b) for p in policies for b in budgets] if merge != "on" else []
    merged = [Cell(p, b, True) for p in mergeable for b in budgets] if merge != "off" else []
    return [Cell("full", 1.0)] + plain + merged


def workload(n: int, seed: int, num_classes: int = 8) -> tuple[list[int], list[int]]:
    """(classes, seeds): image i draws class i mod num_classes (spread over all of them), seed + i."""
    return [i % num_classes for i in range(n)], [seed + i for i in range(n)]


def settings_of(runner: Runner, cell: Cell, seeds: list[int]) -> list[ImageSettings]:
    d = runner.spec.defaults
    return [
        ImageSettings(
            s,
            d.cfg,
            d.top_k,
            d.top_p,
            d.temperature,
            kv_policy=cell.policy,
            kv_budget=cell.budget,
            kv_merge=cell.merge,
        )
        for s in seeds
    ]


@dataclass
class Run:
    """One cell's images and bytes. Bytes per image at `batch` images (stored and full are linear in
    the batch; the working peak is not: one group of rows' current scale is shared by the batch)."""

    tokens: torch.Tensor  # (N, L) long
    images: torch.Tensor  # (N, 3, H, W) uint8, as served
    batch: int
    stored: float
    working: float
    full: float


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


def run_cell(runner: Runner, cell: Cell, classes: list[int], seeds: list[int], batch: int = BATCH) -> Run:
    tokens, images, first = [], [], None
    for start in range(0, len(classes), batch):
        part = slice(start, start + batch)
        out = runner.generate(classes[part], settings_of(runner, cell, seeds[part]))
        tokens.append(out.tokens)
        images.append(to_uint8(out.images))
        first = first or (len(out.tokens), out)
    b, out = first
    return Run(
        torch.cat(tokens),
        torch.cat(images),
        b,
        out.kv_bytes / b,
        out.kv_bytes_working / b,
        out.kv_bytes_full / b,
    )


def scale_agreement(tokens: torch.Tensor, ref: torch.Tensor, patch_nums) -> list[float]:
    """Share of tokens equal to the reference's, per scale, then over all tokens."""
    same = tokens == ref
    per_scale = [float(s.float().mean()) for s in same.split([pn * pn for pn in patch_nums], dim=1)]
    return per_scale + [float(same.float().mean())]


def psnr(images: torch.Tensor, ref: torch.Tensor, cap: float = PSNR_CAP) -> np.ndarray:
    """(N,) dB of each 8-bit image against its reference; identical images get `cap`."""
    mse = (images.double() - ref.double()).pow(2).flatten(1).mean(1)
    db = 10 * torch.log10(255.0**2 / mse.clamp(min=1e-300))
    return torch.where(mse == 0, torch.tensor(cap, dtype=db.dtype), db.clamp(max=cap)).numpy()


@dataclass
class Fidelity:
    agreement: list[float]  # per scale, then overall
    psnr_mean: float
    psnr_differing: float  # mean over the images that differ from full's (nan if none does)
    identical: float  # share of images identical to full's
    accuracy: float
    delta: float  # paired accuracy difference to full, points of 1
    delta_se: float


def fidelity(run: Run, ref: Run, correct: np.ndarray, ref_correct: np.ndarray, patch_nums) -> Fidelity:
    db = psnr(run.images, ref.images)
    same = db >= PSNR_CAP
    diff = correct.astype(float) - ref_correct.astype(float)
    return Fidelity(
        scale_agreement(run.tokens, ref.tokens, patch_nums),
        float(db.mean()),
        float(db[~same].mean()) if (~same).any() else float("nan"),
        float(same.mean()),
        float(correct.mean()),
        float(diff.mean()),
        float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
    )


def shape_correct(clf, run: Run, classes: list[int]) -> np.ndarray:
    return predict(clf, run.images.float() / 255)["shape"] == np.array(classes)


@dataclass
class Speed:
    batch: int
    images_per_s: float  # whole images: engine + VQ-VAE decode
    engine_images_per_s: float  # the engine alone
    working: float  # working bytes per image at this batch
    vs_full: tuple[float, float, float]  # full's summed time / this cell's, 95 % interval (paired)


def speeds(runner: Runner, cells: list[Cell], batch: int, images: int, rounds: int) -> dict[Cell, Speed]:
    """Images/s of each cell at `batch` over `rounds` rounds of `images` images (in batches of
    `batch`), after a warm-up batch of each: every batch is made by each cell in turn, full first,
    so a cell's time is paired with full's on the same images a moment before, and the speed-up
    against full is the ratio of the summed times with a bootstrap interval over the pairs (a
    neighbour's burst slows a pair, not a cell; the best round, as before, gave 0.83-0.94 for
    cells that paired rounds put at 1.0)."""
    classes, seeds = workload(images, 1000)
    for cell in cells:  # warm-up
        runner.generate(classes[:batch], settings_of(runner, cell, seeds[:batch]))
    total = {c: [] for c in cells}
    engine = {c: [] for c in cells}
    working = {}
    for _ in range(rounds):
        for start in range(0, images, batch):
            part = slice(start, start + batch)
            for cell in cells:
                t0 = time.perf_counter()
                out = runner.generate(classes[part], settings_of(runner, cell, seeds[part]))
                elapsed = time.perf_counter() - t0
                total[cell].append(elapsed)
                engine[cell].append(elapsed - out.decode_s)
                working[cell] = out.kv_bytes_working / len(out.tokens)
    n = images * rounds
    base = np.array(total[cells[0]])
    return {
        c: Speed(
            batch,
            n / sum(total[c]),
            n / sum(engine[c]),
            working[c],
            paired_speedup(base, np.array(total[c])),
        )
        for c in cells
    }


def published_table(cells: list[Cell], batch: int = BATCH) -> tuple[list[str], list[list[str]]]:
    """KV bytes at `batch` guided images (rows = 2 x batch) for VAR-d16 and d30 at 256 px, fp16 and
    fp32, from the plans with the default profile (no calibration of those models here)."""
    rows = 2 * batch
    stored_len = sum(pn * pn for pn in PATCH_NUMS_256[:-1])
    head = ["policy", "budget"]
    for name in PUBLISHED:
        head += [f"{name} fp16 MiB", f"{name} fp32 MiB", f"{name} / papers' full"]
    papers = ["papers' full prefix", f"{stored_len} tokens"]
    for depth, heads, d in PUBLISHED.values():
        full = stored_len * 2 * depth * heads * d * rows
        papers += [f"{full * 2 / 2**20:.1f}", f"{full * 4 / 2**20:.1f}", "1.000"]
    table = [papers]
    for cell in cells:
        line = cell_cols(cell)
        for depth, heads, d in PUBLISHED.values():
            geo = ScaleGeometry(PATCH_NUMS_256, depth, heads)
            profile = KVProfile.default(PATCH_NUMS_256, depth, heads)
            fp16 = slab_nbytes(geo, profile, [(cell.policy, cell.budget, cell.merge)] * rows, d, 2)
            fp32 = slab_nbytes(geo, profile, [(cell.policy, cell.budget, cell.merge)] * rows, d, 4)
            papers_full = stored_len * 2 * depth * heads * d * 2 * rows
            line += [f"{fp16 / 2**20:.1f}", f"{fp32 / 2**20:.1f}", f"{fp16 / papers_full:.3f}"]
        table.append(line)
    return head, table


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cell_cols(cell: Cell) -> list[str]:
    return [cell.name, "—" if cell.policy == "full" else f"{cell.budget:.0%}"]


def bytes_table(cells, runs: dict[Cell, Run], b1: dict[Cell, Speed] | None):
    head = [
        "policy",
        "budget",
        "stored KiB/img",
        "stored / full",
        f"working KiB/img b{BATCH}",
        "working / full",
    ]
    head += ["working KiB/img b1", "working b1 / full", "full KiB/img"]
    rows = []
    for c in cells:
        r = runs[c]
        w1 = [f"{b1[c].working / 1024:.1f}", f"{b1[c].working / r.full:.3f}"] if b1 else ["n/a", "n/a"]
        rows.append(
            cell_cols(c)
            + [f"{r.stored / 1024:.1f}", f"{r.stored / r.full:.3f}", f"{r.working / 1024:.1f}"]
            + [f"{r.working / r.full:.3f}", *w1, f"{r.full / 1024:.1f}"]
        )
    return head, rows


def agreement_table(cells, fid: dict[Cell, Fidelity], patch_nums):
    head = ["policy", "budget"] + [f"{pn}×{pn}" for pn in patch_nums] + ["all"]
    return head, [cell_cols(c) + [f"{a:.1%}" for a in fid[c].agreement] for c in cells]


def psnr_table(cells, fid: dict[Cell, Fidelity]):
    head = ["policy", "budget", f"PSNR dB (mean, identical = {PSNR_CAP:.0f})", "PSNR dB (differing)"]
    head += ["identical images"]
    return head, [
        cell_cols(c) + [f"{f.psnr_mean:.2f}", f"{f.psnr_differing:.2f}", f"{f.identical:.1%}"]
        for c, f in ((c, fid[c]) for c in cells)
    ]


def accuracy_table(cells, fid: dict[Cell, Fidelity]):
    full = fid[cells[0]].accuracy
    head = ["policy", "budget", "shape accuracy", "full's", "Δ points (paired ± s.e.)"]
    return head, [
        cell_cols(c) + [f"{f.accuracy:.1%}", f"{full:.1%}", f"{100 * f.delta:+.1f} ± {100 * f.delta_se:.1f}"]
        for c, f in ((c, fid[c]) for c in cells)
    ]


def speed_table(cells, by_batch: list[dict[Cell, Speed]]):
    head = ["policy", "budget"]
    for s in by_batch:
        b = next(iter(s.values())).batch
        head += [f"img/s b{b}", f"engine img/s b{b}", f"b{b} vs full (95 % interval)"]
    rows = []
    for c in cells:
        line = cell_cols(c)
        for s in by_batch:
            line += [f"{s[c].images_per_s:.2f}", f"{s[c].engine_images_per_s:.2f}"]
            ratio, low, high = s[c].vs_full
            line += [f"{ratio:.2f} [{low:.2f}, {high:.2f}]"]
        rows.append(line)
    return head, rows


def machine_line() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load average (1/5/15 min) {load}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="images per cell for fidelity (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=list(COMPRESSING))
    p.add_argument("--budgets", nargs="+", type=float, default=[100 * b for b in BUDGETS], help="percent")
    p.add_argument("--speed-images", type=int, default=16, help="batch-1 images per cell and round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--speed-batches", type=int, default=2, help=f"batches of {BATCH} per cell and round")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument(
        "--merge",
        choices=("off", "on", "both"),
        default="both",
        help="kv_merge cells: without (off), with (on, the policies it applies to) or both (default)",
    )
    args = p.parse_args()
    cells = cells_of(args.policies, [b / 100 for b in args.budgets], args.merge)

    print(machine_line())
    print("\n## KV bytes at batch 16 (guided: 32 rows), VAR-d16 and VAR-d30 at 256 px, from the plans")
    print("(default profile: those models are not calibrated here; the dense store allocates 680/424 of")
    print("full for the last scale's working keys)\n")
    print(markdown(*published_table(cells)), flush=True)

    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes")
    runner = load_runner(spec)
    patch_nums = runner.model.cfg.patch_nums
    t0 = time.perf_counter()
    clf, held_out = train_classifier()
    print(
        f"\nshape classifier: {held_out['shape']:.1%} on 2000 held-out real shapes ({time.perf_counter() - t0:.0f} s)"
    )
    classes, seeds = workload(args.images, args.seed, runner.num_classes)
    print(
        f"var-shapes, {args.images} images per cell (classes i mod 8, seeds {args.seed}..{args.seed + args.images - 1}, "
        f"cfg {spec.defaults.cfg}, top-k {spec.defaults.top_k}), batches of {BATCH}",
        flush=True,
    )

    runs, fid = {}, {}
    t0 = time.perf_counter()
    for cell in cells:
        t1 = time.perf_counter()
        runs[cell] = run_cell(runner, cell, classes, seeds)
        print(f"  {cell.label}: {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)  # progress
    print(f"fidelity runs: {time.perf_counter() - t0:.0f} s", flush=True)
    ref = runs[cells[0]]
    ref_correct = shape_correct(clf, ref, classes)
    for cell in cells:
        fid[cell] = fidelity(
            runs[cell], ref, shape_correct(clf, runs[cell], classes), ref_correct, patch_nums
        )

    b1 = b16 = None
    if not args.no_speed:
        t0 = time.perf_counter()
        b16 = speeds(runner, cells, BATCH, BATCH * args.speed_batches, args.rounds)
        b1 = speeds(runner, cells, 1, args.speed_images, args.rounds)
        print(f"speed runs: {time.perf_counter() - t0:.0f} s", flush=True)

    print("\n## KV bytes per image (var-shapes, fp32; BatchResult)\n")
    print(markdown(*bytes_table(cells, runs, b1)))
    if b16:
        print(
            f"\n## Images/s ({args.rounds} rounds; b1: {args.speed_images} single images per round, "
            f"b{BATCH}: {args.speed_batches} batches per round; each image or batch made by every cell in "
            "turn, full first, and paired with full's; engine = less the VQ-VAE decode)\n"
        )
        print(markdown(*speed_table(cells, [b1, b16])))
    print("\n## Token agreement with full, per scale\n")
    print(markdown(*agreement_table(cells, fid, patch_nums)))
    print("\n## PSNR against full's image (8-bit)\n")
    print(markdown(*psnr_table(cells, fid)))
    print("\n## Shape classifier accuracy on the intended class\n")
    print(markdown(*accuracy_table(cells, fid)))
    print("\n" + machine_line())


if __name__ == "__main__":
    main()
