"""The training data: coloured shapes on black, drawn by this module from a seed (no download).

Each image holds one shape with four attributes: which shape (the class of the class-conditional
models), its colour, its size and where it sits on a 3x3 grid. Shapes are drawn at 32 px, 4x
supersampled with Pillow for smooth edges, and shown at 64 px by bilinear doubling; the tokenizers'
fixed outer level (models/train/outer_levels.py) is that doubling, so 32 px is the detail they learn.
Captions name the colour and shape, and sometimes the size and place, in varied wording
("a small red star in the top left corner", "blue ring, bottom", "there is a big yellow heart").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 64  # what the models serve
DRAW_SIZE = 32  # the detail in it
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
COLOURS = {
    "red": (230, 45, 45),
    "green": (40, 190, 70),
    "blue": (55, 100, 245),
    "yellow": (240, 215, 40),
    "purple": (165, 70, 215),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RADIUS = {"small": (5.0, 7.0), "large": (9.0, 12.0)}  # at 32 px
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")

# Wording. A caption picks one synonym of each word it uses and one template; the size and the place
# are left out of some captions, so a prompt may name any subset of them.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "donut"),
    "heart": ("heart",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
TEMPLATES = (
    "{c} {s}",
    "a {c} {s}",
    "a {z} {c} {s}",
    "a {c} {s} {p}",
    "a {z} {c} {s} {p}",
    "{z} {c} {s}, {p}",
    "there is a {c} {s} {p}",
    "a picture of a {z} {c} {s}",
    "an image with a {c} {s} {p}",
    "{p}: a {c} {s}",
)


@dataclass(frozen=True)
class Shape:
    """One image's content. cx, cy, radius in 32 px units."""

    shape: int
    colour: int
    size: int
    row: int
    col: int
    cx: float
    cy: float
    radius: float


def place_phrases(row: int, col: int) -> tuple[str, ...]:
    """Ways to say where on the 3x3 grid a shape is."""
    r, c = ROWS[row], COLS[col]
    if r == "middle" and c == "centre":
        return ("in the middle", "in the centre", "in the center")
    if r == "middle":
        return (f"on the {c}", f"at the {c}", f"on the {c} side")
    if c == "centre":
        upper = {"top": "upper", "bottom": "lower"}[r]
        return (f"at the {r}", f"at the {r} of the picture", f"in the {upper} middle")
    upper = {"top": "upper", "bottom": "lower"}[r]
    return (f"in the {r} {c} corner", f"at the {r} {c}", f"in the {upper} {c}")


def random_shape(rng: np.random.Generator) -> Shape:
    """A shape with uniform attributes; its centre is uniform within its grid cell, where the cells
    are thirds of the range the centre can take with the whole shape inside the image."""
    shape, colour, size = rng.integers(len(SHAPES)), rng.integers(len(COLOURS)), rng.integers(len(SIZES))
    row, col = rng.integers(3), rng.integers(3)
    radius = rng.uniform(*RADIUS[SIZES[size]])
    lo, hi = radius + 1, DRAW_SIZE - 1 - radius
    third = (hi - lo) / 3
    cx = lo + third * (col + rng.uniform(0.1, 0.9))
    cy = lo + third * (row + rng.uniform(0.1, 0.9))
    return Shape(int(shape), int(colour), int(size), int(row), int(col), cx, cy, radius)


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A polygon for the shapes that are polygons (y grows downwards)."""

    def around(radii, start=-math.pi / 2):
        n = len(radii)
        return [
            (
                cx + rad * math.cos(start + 2 * math.pi * i / n),
                cy + rad * math.sin(start + 2 * math.pi * i / n),
            )
            for i, rad in enumerate(radii)
        ]

    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return around([r] * 3)
    if shape == "diamond":
        return around([r] * 4)
    if shape == "star":
        return around([r, 0.42 * r] * 5)
    if shape == "cross":
        a = 0.34 * r
        return [
            (cx + x, cy + y)
            for x, y in [
                (-a, -r),
                (a, -r),
                (a, -a),
                (r, -a),
                (r, a),
                (a, a),
                (a, r),
                (-a, r),
                (-a, a),
                (-r, a),
                (-r, -a),
                (-a, -a),
            ]
        ]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        s = r / 16.5
        return list(zip((cx + s * x).tolist(), (cy + s * (y + 2)).tolist(), strict=True))
    raise ValueError(shape)


def draw(spec: Shape) -> np.ndarray:
    """-> (DRAW_SIZE, DRAW_SIZE, 3) uint8."""
    from PIL import Image, ImageDraw

    k = SUPERSAMPLE
    img = Image.new("RGB", (DRAW_SIZE * k, DRAW_SIZE * k))
    pen = ImageDraw.Draw(img)
    colour = COLOURS[COLOUR_NAMES[spec.colour]]
    name = SHAPES[spec.shape]
    cx, cy, r = spec.cx * k, spec.cy * k, spec.radius * k
    if name in ("circle", "ring"):
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        if name == "ring":
            h = 0.55 * r
            pen.ellipse((cx - h, cy - h, cx + h, cy + h), fill=(0, 0, 0))
    else:
        pen.polygon(outline(name, cx, cy, r), fill=colour)
    return np.asarray(img.resize((DRAW_SIZE, DRAW_SIZE), Image.Resampling.BOX))


def to_model_pixels(drawn: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 64, 64) float32 in [-1, 1]."""
    x = torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


@dataclass
class ShapeSet:
    """A fixed, seeded set of images and their attributes, each attribute (N,) long."""

    images: torch.Tensor  # (N, 3, 64, 64) float32 in [-1, 1]
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)


def make_shapes(n: int, seed: int) -> ShapeSet:
    rng = np.random.default_rng(seed)
    specs = [random_shape(rng) for _ in range(n)]
    drawn = np.stack([draw(s) for s in specs])

    def column(field: str) -> torch.Tensor:
        return torch.tensor([getattr(s, field) for s in specs], dtype=torch.long)

    return ShapeSet(to_model_pixels(drawn), *(column(f) for f in ("shape", "colour", "size", "row", "col")))


TRAIN_SEED, TRAIN_SIZE = 0, 12000  # the models' training set


def training_set() -> ShapeSet:
    return make_shapes(TRAIN_SIZE, TRAIN_SEED)


def caption(
    shape: int, colour: int, size: int | None, row: int | None, col: int | None, rng, templates=TEMPLATES
) -> str:
    """One caption in a random wording. size / row and col None: a template without them."""
    choices = [
        t for t in templates if ("{z}" in t) == (size is not None) and ("{p}" in t) == (row is not None)
    ]
    template = choices[rng.integers(len(choices))]

    def pick(options):
        return options[rng.integers(len(options))]

    return template.format(
        c=COLOUR_NAMES[colour],
        s=pick(SHAPE_WORDS[SHAPES[shape]]),
        z="" if size is None else pick(SIZE_WORDS[SIZES[size]]),
        p="" if row is None else pick(place_phrases(row, col)),
    )


def training_caption(data: ShapeSet, i: int, rng: np.random.Generator) -> str:
    """A caption of image i that names its colour and shape, its size half of the time and its
    place half of the time."""
    size = int(data.size[i]) if rng.random() < 0.5 else None
    place = rng.random() < 0.5
    row, col = (int(data.row[i]), int(data.col[i])) if place else (None, None)
    return caption(int(data.shape[i]), int(data.colour[i]), size, row, col, rng)
