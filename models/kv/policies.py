"""KV-cache compression policies for next-scale models: what each (row, layer, head) keeps of the
prefix later scales read (models/kv/compressed.py applies them; docs: README "KV-cache compression").

A policy has two parts, both pure functions of their inputs (no global state; a store builds a
plan per batch and keeps it):

- `plan(geo, profile, budget) -> counts`, (S - 1, depth, H) long: how many tokens each segment
  (layer, head) holds after scale si, for the S - 1 scales whose keys later scales read. Counts
  are static (they depend on the budget and the offline profile, never on the image), so the
  store sizes its slab once, every row of a policy holds the same counts (no batch dependence
  through ragged shapes), and the bytes held are known before the first scale.
- `rank(c: Candidates, profile) -> (tier, key)`, each (G, M): for every segment's candidates (its
  stored keys, then the scale just computed) a priority tier and, within a tier, a key; the store
  keeps the `counts[si]` best by (tier, key), ties broken by candidate index (older first), so
  the choice depends on the segment's own numbers only. `observed(geo, si)` names the current
  scale's queries whose attention mass a policy ranks by (None: no mass needed).

The budget `b` in (0, 1] is a fraction of the full stored prefix (424 tokens per row at 680): the
mean per (layer, head) segment is at most B = floor(b * 424) tokens, so the stored bytes are at most
b times the full prefix's. Counts never exceed what has been produced (min(B, tokens so far)), and
a policy compresses only once a segment would hold more than its share.

Policies (one class each):

- `full`: everything (the dense store's result).
- `window` (StreamingLLM-like): the first `sink_scales` scales (the 1x1 and 2x2 maps, 5 tokens),
  then the most recent positions up to B (whole recent scales, and the tail of the one that does
  not fit).
- `snapkv` (H2O / SnapKV-like): the B keys of [stored | current] with the most softmax attention
  mass from the current scale's queries (the whole scale is the observation window; no pooling).
- `hack` (HACK, arXiv 2504.09261, from its abstract and digests: the method sections could not be
  read): heads are structural or contextual from the profile (`head_class`). Budgets are
  asymmetric: with a fraction a of contextual heads, B = a * B_C + (1 - a) * B_S and B_S =
  `ratio` * B_C (B_S at most the full prefix, the rest then goes to the contextual heads).
  Contextual heads keep their top B_C keys by attention mass; structural heads keep the first
  `sink_scales` scales first, then the most recent scale, then the rest by mass (tiers: when
  the protected tokens do not fit in B_S, the newest scale's tokens compete by mass among
  themselves). Mass is that of up to `n_obs` = 32 current-scale queries, uniformly strided (the
  paper's "subset attention"). Chosen where the paper leaves it open or we could not read it,
  measured on the bundled var-shapes model (PSNR against the full cache, same seeds, 64 px, heads
  split in half by the column variance of their last-scale attention, a stand-in for
  `varserve calibrate`): ratio = 2, the paper's direction (B_C < B_S); at 10 % ratios 0.5, 1 and 2
  were within noise (23.1, 23.2, 22.4 +- 0.8 dB over 32 images; snapkv 24.3), ratio 4 fell
  clearly behind (21.4 against 23.7 for ratio 1 over 12); 32 strided queries matched all of
  them (22.5 against 22.8) at a fifth of the mass work on the 13x13 scale; without the sink
  protection structural heads lost 3 dB. Attention runs over the full
  [stored | current] and the cache is compressed after the scale (HACK selects before attending,
  which also cuts the scale's attention; we keep the store's one order for every policy); no
  soft-merge of evicted keys; the last scale is never compressed (it is never stored).
- `scalekv` (ScaleKV, arXiv 2505.19602): per query scale, layers are drafters or refiners from
  the profile (`layer_role`). The cache kept after scale si is read by scale si + 1, so its
  roles apply; refiners keep `refiner_share` (1/2) of B, drafters share the rest (at most all
  they have), so the layer mean is B. The slab is planned once per batch, so a layer's
  capacity is what the roles of the last scale give it, and at earlier scales its count is its
  role's within that capacity (ScaleKV's own roles barely change across scales). Scoring follows
  the paper, not the official code: the softmax attention mass (normalised q with the head
  temperature, as attention itself) of an observation window of 16 current-scale queries at the
  centres of a 4x4 grid over the map, whose own keys are kept first where the segment keeps at
  least twice as many (below that they compete by mass: at a 5 % budget a refiner layer keeps 10
  tokens, and protecting the 16 dropped every earlier scale, 12.6 dB against full; ranked with the
  rest, 20.1 dB over 48 images); the official code ranks by
  raw logits of un-normalised queries summed without a softmax and max-pools them over the flat
  sequence, which we do not copy.
- `heatkv` (HeatKV, arXiv 2605.14877): whole (layer, head, scale) segments ranked by the profile's
  `segment_score` per token the segment holds (S-CAS is one query's mass on the whole scale, so a
  13x13 segment scores more than a 4x4 one by its size alone; ranked by the raw score the 4x4
  scale went first and every image changed from the 5x5 map on: 18.9 dB against full at a 50 %
  budget, 27.5 dB per token, 48 images); a static schedule drops the lowest first (ties: the finer
  scale first, as it frees the most, then by layer and head) until the row's total holds L * H * B, the first
  `sink_scales` = 3 scales (14 tokens) last of all (below 14 tokens a segment, the finest sink
  scale first). No attention mass at run time: a dropped
  segment is never written.
- `valuekv` (ours; value-aware eviction after VATP, "Attention Score is not All You Need for
  Token Importance Indicator in KV Cache Reduction: Value Also Matters", arXiv 2406.12335): the B
  keys of [stored | current] with the most attention mass times the squared norm of their value
  (`value_power` = 2). A key's share of a query's output is its probability times its value, so a
  key that draws mass with a small value (the sink-like 1x1 class position draws up to 80 % of a
  head's mass) matters less than its mass says. The power was chosen on var-shapes (PSNR against
  full, 48 images, seeds 0..47): snapkv's mass alone 23.6 / 20.5 dB at 10 / 5 %; times |v| 24.2 /
  21.4, times |v|^2 24.9 / 21.9, |v|^3 24.8 / 21.9, |v|^4 24.2 / 20.7. Over 200 images (bench/
  kv_fidelity.py) it leads every policy at every budget: 35.6 / 31.5 / 24.5 / 21.5 dB at 50 / 25 /
  10 / 5 % against snapkv's 33.5 / 29.7 / 23.4 / 20.2. The same factor on hack's contextual
  ranking gave 24.0 dB at 10 % (23.1 without): it helps any mass ranking, but the papers' methods
  keep their own scores here. Not head- or scale-aware: on this model per-head budgets from
  offline mass-coverage curves did worse than uniform ones (18.0 against 20.5 dB at 5 %), and so
  did mass accumulated over the scales a key was seen (H2O-like: 19.6 dB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.kv.profile import KVProfile
from models.settings import KV_POLICY_NAMES


@dataclass(frozen=True)
class ScaleGeometry:
    """The scales of a next-scale model and the shape of its attention."""

    patch_nums: tuple[int, ...]
    depth: int
    num_heads: int

    @property
    def sizes(self) -> list[int]:
        return [pn * pn for pn in self.patch_nums]

    @property
    def starts(self) -> list[int]:
        """First position of each scale."""
        return [sum(self.sizes[:s]) for s in range(len(self.patch_nums))]

    @property
    def stored_len(self) -> int:
        """Positions later scales read: every scale but the last (424 of 680)."""
        return sum(self.sizes[:-1])

    def produced(self, si: int) -> int:
        """Tokens of scales 0..si."""
        return sum(self.sizes[: si + 1])

    def scale_of_position(self) -> torch.Tensor:
        """(L,) long: the scale of each position."""
        return torch.cat([torch.full((n,), s) for s, n in enumerate(self.sizes)])


@dataclass
class Candidates:
    """The candidates of G segments (rows x heads of one layer) after scale si: columns
    [stored keys, padded | the n keys of scale si]. pos, scale: (G, M) long, -1 where invalid;
    valid: (G, M) bool; mass: (G, M) fp32, the observed queries' attention mass, or None;
    heads: (G,) long, the head of each segment; obs_pos: the observed queries' positions; keep:
    (G,) long, how many each segment keeps after this scale; value_norm: (G, M) fp32, each
    candidate's value norm (0 where invalid), for a policy that `uses_values`."""

    layer: int
    si: int
    heads: torch.Tensor
    pos: torch.Tensor
    scale: torch.Tensor
    valid: torch.Tensor
    mass: torch.Tensor | None = None
    obs_pos: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    value_norm: torch.Tensor | None = None


def budget_tokens(geo: ScaleGeometry, budget: float) -> int:
    """B: the mean tokens per segment a budget allows (the 1e-9 absorbs 0.1 * 424 = 42.400000001)."""
    return math.floor(budget * geo.stored_len + 1e-9)


def grow(geo: ScaleGeometry, target: torch.Tensor) -> torch.Tensor:
    """target: (S - 1, depth, H) the most a segment may hold after each scale -> counts: what it
    holds, min(target, what it held + the new scale)."""
    counts = torch.zeros_like(target)
    held = torch.zeros_like(target[0])
    for si in range(target.shape[0]):
        held = torch.minimum(held + geo.sizes[si], target[si])
        counts[si] = held
    return counts


def plan_evicts(geo: ScaleGeometry, counts: torch.Tensor) -> bool:
    """counts: (S - 1, depth, H) a plan -> whether some segment holds fewer keys than were produced
    (what kv_merge needs a log-count slab for)."""
    return bool((counts < torch.tensor(geo.starts[1:])[:, None, None]).any())


def _uniform(geo: ScaleGeometry, tokens) -> torch.Tensor:
    """(S - 1, depth, H) filled with `tokens` (an int, or a (depth, H) tensor)."""
    return (
        torch.as_tensor(tokens, dtype=torch.long).expand(len(geo.sizes) - 1, geo.depth, geo.num_heads).clone()
    )


def _no_mass(c: Candidates) -> torch.Tensor:
    return torch.zeros(c.pos.shape, dtype=torch.float32)


def strided_queries(n: int, count: int) -> torch.Tensor:
    """`count` query indices spread uniformly over 0..n-1 (all of them when n <= count)."""
    if n <= count:
        return torch.arange(n)
    return (torch.arange(count) * n) // count + n // (2 * count)


def grid_centres(pn: int, cells: int = 4) -> torch.Tensor:
    """Indices y * pn + x of the centres of a cells x cells grid over a pn x pn map (fewer, without
    repeats, on maps smaller than the grid)."""
    axis = sorted({int((i + 0.5) * pn / cells) for i in range(cells)})
    return torch.tensor([y * pn + x for y in axis for x in axis])


class Full:
    name = "full"
    append_only = True  # keeps every new key: the store appends without ranking
    evicts = False  # nothing to merge (kv_merge has no effect)

    def plan(self, geo: ScaleGeometry, profile: KVProfile, budget: float) -> torch.Tensor:
        return grow(geo, _uniform(geo, geo.stored_len))

    def observed(self, geo: ScaleGeometry, si: int) -> torch.Tensor | None:
        return None

    def rank(self, c: Candidates, profile: KVProfile):
        return torch.zeros_like(c.pos), _no_mass(c)


@dataclass(frozen=True)
class Window:
    sink_scales: int = 2
    name = "window"
    append_only = False
    evicts = True

    def plan(self, geo, profile, budget):
        return grow(geo, _uniform(geo, budget_tokens(geo, budget)))

    def observed(self, geo, si):
        return None

    def rank(self, c, profile):
        sink = (c.scale >= 0) & (c.scale < self.sink_scales)
        # sinks first (the earliest of them if even they do not fit), then the most recent positions
        return sink.long(), torch.where(sink, -c.pos, c.pos).float()


@dataclass(frozen=True)
class SnapKV:
    name = "snapkv"
    append_only = False
    evicts = True

    def plan(self, geo, profile, budget):
        return grow(geo, _uniform(geo, budget_tokens(geo, budget)))

    def observed(self, geo, si):
        return torch.arange(geo.sizes[si])

    def rank(self, c, profile):
        return torch.zeros_like(c.pos), c.mass


@dataclass(frozen=True)
class HACK:
    ratio: float = 2.0  # B_S / B_C
    n_obs: int = 32
    sink_scales: int = 2
    name = "hack"
    append_only = False
    evicts = True

    def class_budgets(self, geo: ScaleGeometry, profile: KVProfile, budget: float) -> tuple[int, int]:
        """(B_C, B_S): contextual and structural tokens per head, a * B_C + (1 - a) * B_S <= B."""
        B, full = budget_tokens(geo, budget), geo.stored_len
        heads = [c for row in profile.head_class for c in row]
        a = heads.count("contextual") / len(heads)
        if a in (0.0, 1.0):
            return B, B
        b_c = B / (a + (1 - a) * self.ratio)
        b_s = self.ratio * b_c
        if b_s > full:  # structural heads keep everything; the rest goes to the contextual ones
            b_s, b_c = full, (B - (1 - a) * full) / a
        return math.floor(b_c + 1e-9), math.floor(b_s + 1e-9)

    def plan(self, geo, profile, budget):
        b_c, b_s = self.class_budgets(geo, profile, budget)
        per_head = torch.tensor(
            [[b_s if c == "structural" else b_c for c in row] for row in profile.head_class]
        )
        return grow(geo, _uniform(geo, per_head))

    def observed(self, geo, si):
        return strided_queries(geo.sizes[si], self.n_obs)

    def rank(self, c, profile):
        by_head = [h == "structural" for h in profile.head_class[c.layer]]
        structural = torch.tensor(by_head, device=c.heads.device)[c.heads]  # (G,), on the segments' device
        tier = torch.where(c.scale < self.sink_scales, 2, torch.where(c.scale == c.si, 1, 0))
        tier = torch.where(structural[:, None] & (c.scale >= 0), tier, 0)
        return tier, c.mass


@dataclass(frozen=True)
class ScaleKV:
    refiner_share: float = 0.5
    window_cells: int = 4
    name = "scalekv"
    append_only = False
    evicts = True

    def layer_budgets(self, geo: ScaleGeometry, roles: tuple[str, ...], available: int, B: int) -> list[int]:
        """Tokens per layer at one scale: drafters large, refiners small, sum <= depth * B."""
        L = geo.depth
        drafters = [i for i, r in enumerate(roles) if r == "drafter"]
        if len(drafters) in (0, L):
            return [B] * L
        n_d, n_r = len(drafters), L - len(drafters)
        b_d = min(available, (L * B - n_r * math.floor(self.refiner_share * B)) // n_d)
        b_r = (L * B - n_d * b_d) // n_r
        return [b_d if r == "drafter" else b_r for r in roles]

    def plan(self, geo, profile, budget):
        B, S = budget_tokens(geo, budget), len(geo.sizes)
        # the cache after scale si is read by scale si + 1: its roles
        per_scale = [
            self.layer_budgets(geo, profile.layer_role[si + 1], geo.produced(si), B) for si in range(S - 1)
        ]
        cap = torch.tensor(per_scale[-1])  # the slab: what the last scale's roles give each layer
        target = torch.minimum(torch.tensor(per_scale), cap)  # (S - 1, depth)
        return grow(geo, target[:, :, None].expand(-1, -1, geo.num_heads).clone())

    def observed(self, geo, si):
        return grid_centres(geo.patch_nums[si], self.window_cells)

    def rank(self, c, profile):
        window = (c.pos[:, :, None] == c.obs_pos[None, None, :]).any(-1) & (c.scale == c.si)
        # the window's own keys are kept first only where they leave room for the prefix: a
        # segment keeping fewer than twice the window ranks them by mass with the rest (at a 5 %
        # budget a refiner layer keeps 10 tokens, and protecting 16 would drop every earlier scale)
        if c.keep is not None:
            window &= (c.keep >= 2 * len(c.obs_pos)).to(window.device)[:, None]
        return window.long(), c.mass


@dataclass(frozen=True)
class HeatKV:
    sink_scales: int = 3
    name = "heatkv"
    append_only = True  # a kept segment takes its whole scale, a dropped one nothing
    evicts = True

    def kept(self, geo: ScaleGeometry, profile: KVProfile, budget: float) -> torch.Tensor:
        """(depth, H, S - 1) bool: the (layer, head, scale) segments the static schedule keeps."""
        S, L, H = len(geo.sizes), geo.depth, geo.num_heads
        allowed = L * H * budget_tokens(geo, budget)
        items = [(l, h, s) for l in range(L) for h in range(H) for s in range(S - 1)]

        def order(item):  # unprotected first: the least score per token freed, then the finer
            l, h, s = item  # (larger) scale, layer, head; then, only below the sinks' own size, the
            score = profile.segment_score[l][h][s]  # sinks: the finest first
            return (
                (True, -s, score, item) if s < self.sink_scales else (False, score / geo.sizes[s], -s, item)
            )

        items.sort(key=order)
        keep = torch.ones(L, H, S - 1, dtype=torch.bool)
        held = L * H * geo.stored_len
        for l, h, s in items:
            if held <= allowed:
                break
            keep[l, h, s] = False
            held -= geo.sizes[s]
        return keep

    def plan(self, geo, profile, budget):
        sizes = torch.tensor(geo.sizes[:-1])
        per_scale = self.kept(geo, profile, budget).long() * sizes  # (depth, H, S - 1)
        return per_scale.cumsum(-1).permute(2, 0, 1).contiguous()

    def observed(self, geo, si):
        return None

    def rank(self, c, profile):
        raise NotImplementedError("heatkv is append-only: the store never ranks its candidates")


@dataclass(frozen=True)
class ValueKV(SnapKV):  # snapkv's plan and observed queries; its own ranking
    value_power: float = 2.0
    name = "valuekv"
    uses_values = True

    def rank(self, c, profile):
        return torch.zeros_like(c.pos), c.mass * c.value_norm.pow(self.value_power)


POLICIES = {p.name: p for p in (Full(), Window(), SnapKV(), HACK(), ScaleKV(), HeatKV(), ValueKV())}
KV_POLICIES = tuple(POLICIES)
assert KV_POLICIES == KV_POLICY_NAMES, (KV_POLICIES, KV_POLICY_NAMES)


def policy(name: str):
    """The policy of that name; ValueError naming the choices."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown KV policy '{name}': one of {', '.join(KV_POLICIES)}") from None


def check_budget(budget: float) -> None:
    if not (isinstance(budget, int | float) and 0 < budget <= 1):
        raise ValueError(f"kv_budget is {budget!r}: give a fraction in (0, 1] of the full stored prefix")
