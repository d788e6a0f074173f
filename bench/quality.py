"""Do the bundled models draw what they are asked for, and more than copies of their training set?

    python -m bench.quality [--config models/default/models.toml] [--per-class 50] [--seed 0] [--no-speed]

A small CNN trained on freshly drawn shapes (models/train/data.py, seeds the models never saw) reads
every attribute of an image: shape, colour, size, row and column. Class models get `per-class`
images of every shape; the text model gets as many captions per shape, of random colour and, half of
the time each, size and place, in training wordings and in wordings it never saw (EVAL_TEMPLATES).
Per model and shape it prints the share recognised, then for the text model how often colour, size
and place follow the caption; and two diversity figures per shape: the share of distinct token
sequences among the samples, and the mean distance from each image to its nearest training image,
beside the same distance for real held-out shapes (a model that copies its training set sits far
below that). A second table gives each model's sequence and speed figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.config import DEFAULT_CONFIG, ModelSpec, load_config
from models.runner import Runner, load_runner
from models.settings import ImageSettings
from models.train import data as shapes

ATTRIBUTES = {
    "shape": len(shapes.SHAPES),
    "colour": len(shapes.COLOURS),
    "size": len(shapes.SIZES),
    "row": 3,
    "col": 3,
}
CLASSIFIER_TRAIN_SEED, CLASSIFIER_TEST_SEED = 1, 2  # the models trained on seed 0 (data.TRAIN_SEED)
# Wordings the text model never saw in training, beside the training ones.
EVAL_TEMPLATES = (
    "a drawing of a {c} {s}",
    "one {z} {c} {s}",
    "a {c} {s} placed {p}",
    "draw a {z} {c} {s} {p}",
)


class ShapeClassifier(nn.Module):
    """images (B, 3, 32, 32) in [-1, 1] -> logits per attribute {name: (B, classes)}."""

    def __init__(self):
        super().__init__()

        def stage(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(stage(3, 32), stage(32, 64), stage(64, 64), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, n) for name, n in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 64, 64) in [0, 1] -> (B, 3, 32, 32) in [-1, 1]: the drawn detail, area-downscaled."""
    return F.interpolate(images.float(), size=(shapes.DRAW_SIZE,) * 2, mode="area") * 2 - 1


def labels_of(data: shapes.ShapeSet) -> dict[str, torch.Tensor]:
    return {name: getattr(data, name) for name in ATTRIBUTES}


def train_classifier(n: int = 8000, steps: int = 400, batch: int = 64, seed: int = 0):
    """-> (classifier in eval mode, {attribute: accuracy on 2000 held-out real shapes})."""
    torch.manual_seed(seed)
    train_set = shapes.make_shapes(n, CLASSIFIER_TRAIN_SEED)
    x, y = classifier_input(train_set.images.add(1).mul(0.5)), labels_of(train_set)
    clf = ShapeClassifier()
    opt = torch.optim.AdamW(clf.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=gen)
        logits = clf(x[idx])
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    test = shapes.make_shapes(2000, CLASSIFIER_TEST_SEED)
    predicted = predict(clf, test.images.add(1).mul(0.5))
    held_out = {k: float((predicted[k] == labels_of(test)[k].numpy()).mean()) for k in ATTRIBUTES}
    return clf, held_out


@torch.no_grad()
def predict(clf: ShapeClassifier, images: torch.Tensor) -> dict[str, np.ndarray]:
    """images (N, 3, 64, 64) in [0, 1] -> {attribute: (N,) predicted class}."""
    out = {k: [] for k in ATTRIBUTES}
    for part in classifier_input(images).split(500):
        for k, v in clf(part).items():
            out[k].append(v.argmax(1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def conditions_for(runner: Runner, per_class: int, seed: int = 0) -> tuple[list, dict[str, np.ndarray]]:
    """-> (a condition per image, {attribute: (N,) what the image should show, -1 where the condition
    leaves it open}), per_class images of each shape, shape by shape."""
    rng = np.random.default_rng(seed)
    conditions, want = [], {k: [] for k in ATTRIBUTES}
    for shape in range(len(shapes.SHAPES)):
        for _ in range(per_class):
            target = dict(shape=shape, colour=-1, size=-1, row=-1, col=-1)
            if runner.conditioning == "class":
                conditions.append(shape)
            else:
                colour = int(rng.integers(len(shapes.COLOURS)))
                size = int(rng.integers(2)) if rng.random() < 0.5 else None
                row, col = (
                    (int(rng.integers(3)), int(rng.integers(3))) if rng.random() < 0.5 else (None, None)
                )
                templates = EVAL_TEMPLATES if rng.random() < 0.3 else shapes.TEMPLATES
                conditions.append(shapes.caption(shape, colour, size, row, col, rng, templates))
                target.update(
                    colour=colour, size=-1 if size is None else size, row=-1 if row is None else row
                )
                target["col"] = -1 if col is None else col
            for k, v in target.items():
                want[k].append(v)
    return conditions, {k: np.array(v) for k, v in want.items()}


def params_for(spec: ModelSpec, seeds: list[int]) -> list[ImageSettings]:
    d = spec.defaults
    return [ImageSettings(s, d.cfg, d.top_k, d.top_p, d.temperature) for s in seeds]


def generate(runner: Runner, conditions: list, seed: int, batch_size: int = 50):
    """Image i uses seed + i. -> images (N, 3, H, W) in [0, 1], tokens (N, L) long."""
    images, tokens = [], []
    for start in range(0, len(conditions), batch_size):
        part = conditions[start : start + batch_size]
        seeds = list(range(seed + start, seed + start + len(part)))
        out = runner.generate(part, params_for(runner.spec, seeds))
        images.append(out.images)
        tokens.append(out.tokens)
    return torch.cat(images), torch.cat(tokens)


def accuracy(
    predicted: dict[str, np.ndarray], want: dict[str, np.ndarray], attribute: str, where=None
) -> float:
    """Share of the images whose condition names the attribute that show it (nan if none does)."""
    named = want[attribute] >= 0
    if where is not None:
        named &= where
    if not named.any():
        return float("nan")
    return float((predicted[attribute][named] == want[attribute][named]).mean())


def place_accuracy(predicted: dict[str, np.ndarray], want: dict[str, np.ndarray], where=None) -> float:
    """Share of the images whose condition names a place that show it (row and column both)."""
    named = want["row"] >= 0
    if where is not None:
        named &= where
    if not named.any():
        return float("nan")
    hit = (predicted["row"] == want["row"]) & (predicted["col"] == want["col"])
    return float(hit[named].mean())


def distinct_share(tokens: torch.Tensor) -> float:
    """Share of distinct token sequences among the rows of tokens (N, L)."""
    return len({tuple(t) for t in tokens.tolist()}) / len(tokens)


def nearest_distance(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Root-mean-square pixel distance ([0, 1] scale, at 32 px) from each image to its nearest
    reference image: images (N, 3, 64, 64), reference (M, 3, 32, 32) flattened as classifier input."""
    q = classifier_input(images).flatten(1)
    r = reference.flatten(1)
    best = torch.cat([torch.cdist(part, r).min(1).values for part in q.split(256)])
    return (best / 2 / q.shape[1] ** 0.5).numpy()  # [-1, 1] -> [0, 1] pixels, per-value RMS


def images_per_second(runner: Runner, batch: int, repeats: int = 3) -> tuple[float, object]:
    """Best of `repeats` timed batches after a warm-up (the machine is shared) -> (images/s, result)."""
    conditions, _ = conditions_for(runner, 1)
    conditions = (conditions * batch)[:batch]
    params = params_for(runner.spec, list(range(batch)))
    out = runner.generate(conditions, params)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.generate(conditions, params)
        best = min(best, time.perf_counter() - t0)
    return batch / best, out


def quality_table(spec: ModelSpec, runner, clf, train_ref, real_nn: float, per_class: int, seed: int) -> dict:
    conditions, want = conditions_for(runner, per_class, seed)
    images, tokens = generate(runner, conditions, seed)
    predicted = predict(clf, images)
    nn_dist = nearest_distance(images, train_ref)
    text = runner.conditioning == "text"
    print(f"\n{spec.name} ({len(conditions)} images, seeds {seed}..{seed + len(conditions) - 1})")
    head = f"  {'shape':<10}{'shape ok':>9}"
    head += f"{'colour ok':>10}{'size ok':>8}{'place ok':>9}" if text else ""
    print(head + f"{'distinct':>9}{'nn dist':>9}")
    per_shape = []
    for s, name in enumerate(shapes.SHAPES):
        mine = want["shape"] == s
        acc = accuracy(predicted, want, "shape", mine)
        per_shape.append(acc)
        row = f"  {name:<10}{acc:>9.0%}"
        if text:
            row += f"{accuracy(predicted, want, 'colour', mine):>10.0%}{accuracy(predicted, want, 'size', mine):>8.0%}"
            row += f"{place_accuracy(predicted, want, mine):>9.0%}"
        row += f"{distinct_share(tokens[torch.from_numpy(mine)]):>9.0%}{nn_dist[mine].mean():>9.3f}"
        print(row)
    overall = accuracy(predicted, want, "shape")
    row = f"  {'all':<10}{overall:>9.1%}"
    if text:
        row += f"{accuracy(predicted, want, 'colour'):>10.1%}{accuracy(predicted, want, 'size'):>8.1%}"
        row += f"{place_accuracy(predicted, want):>9.1%}"
    print(
        row + f"{distinct_share(tokens):>9.0%}{nn_dist.mean():>9.3f}   (real held-out shapes: {real_nn:.3f})"
    )
    return {"accuracy": overall, "min_class": min(per_shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model", action="append", help="only this model (repeatable; default: all in the config)"
    )
    p.add_argument("--no-speed", action="store_true", help="skip the speed table")
    p.add_argument("--no-quality", action="store_true", help="only the speed table (any models)")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    specs = [s for s in load_config(args.config) if args.model is None or s.name in args.model]
    runners = {spec.name: load_runner(spec) for spec in specs}
    summary = {}
    if not args.no_quality:
        clf, held_out = train_classifier()
        print(
            "classifier (CNN on 8000 drawn shapes), accuracy on 2000 held-out real shapes: "
            + ", ".join(f"{k} {v:.1%}" for k, v in held_out.items())
        )
        train_ref = classifier_input(shapes.training_set().images.add(1).mul(0.5))
        real = shapes.make_shapes(400, CLASSIFIER_TEST_SEED + 1).images.add(1).mul(0.5)
        real_nn = float(nearest_distance(real, train_ref).mean())
        for spec in specs:
            summary[spec.name] = quality_table(
                spec, runners[spec.name], clf, train_ref, real_nn, args.per_class, args.seed
            )
    if args.no_speed:
        return
    print(
        f"\n{'model':<22}{'tokens':>7}{'passes/img':>11}{'KV KiB/img':>11}{'ms b1':>8}"
        f"{'img/s b1':>9}{'img/s b16':>10}{'accuracy':>9}"
    )
    for spec in specs:
        runner = runners[spec.name]
        b1, out = images_per_second(runner, 1)
        b16, _ = images_per_second(runner, 16)
        acc = summary.get(spec.name, {}).get("accuracy", float("nan"))
        print(
            f"{spec.name:<22}{out.tokens.shape[1]:>7}{out.forward_passes:>11}{out.kv_bytes / 1024:>11.1f}"
            f"{1000 / b1:>8.0f}{b1:>9.2f}{b16:>10.2f}{acc:>9.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
