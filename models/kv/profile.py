"""A next-scale model's attention profile: what the compression policies learn offline about its
heads, layers and scales (`varserve calibrate` measures it on full-cache generations; the loader
reads it from beside the model's config, `<config dir>/<model name>.kvprofile.json`).

Shapes, for a model of `depth` layers, `num_heads` heads and S = len(patch_nums) scales:
- `head_class` (depth, num_heads): "structural" | "contextual" (HACK): a structural head attends
  in a fixed spatial pattern (the first scales and the most recent one), a contextual one by
  content (attention spread over the prefix).
- `layer_role` (S, depth): "drafter" | "refiner" (ScaleKV), per query scale: a drafter's attention
  spreads over many scales (it gets a large budget), a refiner's stays on the current map (small).
- `segment_score` (depth, num_heads, S): HeatKV's scale-dependent cumulative attention score of
  the keys of (layer, head, key scale), over the query scales that read them; segments are
  dropped lowest score first by a static schedule.

Without a profile file, `KVProfile.default(...)` applies: every head contextual, every layer a
drafter, every segment scored equally (1.0), so the policies that need a profile fall back to
attention mass alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

HEAD_CLASSES = ("structural", "contextual")
LAYER_ROLES = ("drafter", "refiner")
SUFFIX = ".kvprofile.json"


@dataclass(frozen=True)
class KVProfile:
    patch_nums: tuple[int, ...]
    depth: int
    num_heads: int
    head_class: tuple[tuple[str, ...], ...]  # (depth, num_heads)
    layer_role: tuple[tuple[str, ...], ...]  # (S, depth)
    segment_score: tuple[tuple[tuple[float, ...], ...], ...]  # (depth, num_heads, S)
    source: dict = field(default_factory=dict)  # how it was measured: prompts, seeds, statistic

    def __post_init__(self):
        S = len(self.patch_nums)
        _check_shape("head_class", self.head_class, (self.depth, self.num_heads))
        _check_shape("layer_role", self.layer_role, (S, self.depth))
        _check_shape("segment_score", self.segment_score, (self.depth, self.num_heads, S))
        bad = {c for row in self.head_class for c in row} - set(HEAD_CLASSES)
        bad |= {r for row in self.layer_role for r in row} - set(LAYER_ROLES)
        if bad:
            raise ValueError(f"unknown head classes or layer roles: {sorted(bad)}")

    @classmethod
    def default(cls, patch_nums: tuple[int, ...], depth: int, num_heads: int) -> KVProfile:
        S = len(patch_nums)
        return cls(
            tuple(patch_nums),
            depth,
            num_heads,
            tuple(("contextual",) * num_heads for _ in range(depth)),
            tuple(("drafter",) * depth for _ in range(S)),
            tuple(tuple((1.0,) * S for _ in range(num_heads)) for _ in range(depth)),
            {"statistic": "default: no calibration"},
        )

    def matches(self, patch_nums: tuple[int, ...], depth: int, num_heads: int) -> bool:
        return (tuple(self.patch_nums), self.depth, self.num_heads) == (tuple(patch_nums), depth, num_heads)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> KVProfile:
        """Raises ValueError naming the file for anything that is not a profile."""
        try:
            doc = json.loads(Path(path).read_text())
            return cls(
                tuple(doc["patch_nums"]),
                int(doc["depth"]),
                int(doc["num_heads"]),
                _tuples(doc["head_class"]),
                _tuples(doc["layer_role"]),
                _tuples(doc["segment_score"]),
                doc.get("source", {}),
            )
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a KV profile ({type(e).__name__}: {e})") from None


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _check_shape(name: str, value, shape: tuple[int, ...]) -> None:
    if len(value) != shape[0]:
        raise ValueError(f"{name}: {len(value)} entries, expected {shape[0]}")
    if len(shape) > 1:
        for row in value:
            _check_shape(name, row, shape[1:])
