"""Calibration: measure where a next-scale model's attention goes, and derive its KV profile.

A few full-cache generations run through the unchanged engine with a `RecordingScaleStore` around
the dense store; it returns the dense store's attention (so the images are the uncalibrated ones)
and adds up the softmax mass every (layer, head, query scale) puts on each key scale, guidance rows
counted as rows of their own: `mass` (depth, H, S, S), indexed [layer, head, query scale, key scale].
Its sum over key scales is the number of queries times the rows that ran (softmax rows sum to 1).
Everything below is a pure function of that tensor, so the rules can be tested on made-up masses.

Per (layer, head, query scale k), `shares` is the mass as a distribution over key scales 0..k.

- HACK head class. The paper splits heads by the column-wise variance of their attention maps; that
  needs token-level maps, and what a structural head does in HACK's compression is keep the first
  two scales (N_init) and the most recent one and fill the rest by score. So we classify by how much
  of a head's attention that protected set explains: for query scales k >= 3 (below that the set is
  everything), f_k = share on scales {0, 1, k}, taken relative to a head that spreads evenly over
  the keys (u_k = (n_0 + n_1 + n_k) / T_k: 0.38 at 16x16 and 0.70 at 4x4): e_k = (f_k - u_k) /
  (1 - u_k), 0 for even attention, 1 for a head that reads nothing else. The statistic is the mean
  of e_k over those scales; a head is structural when it is at least STRUCTURAL_EXCESS (0.5: more
  than half way from even attention to the protected set alone). Measured on var-shapes (16 images),
  the 16 heads score -0.04 ... 0.43, then 0.58 ... 0.79: 0.5 sits in the widest gap of the upper
  half and gives 6 structural heads (0, 2, 3, 1 in layers 0-3); 40 images move no head across it;
  the random-weight fixtures score -0.02 ... 0.04 (no structural head). A fixed threshold, not HACK's
  ratio alpha of a global ranking, because a ratio always declares some heads structural, and on a
  model where no head is (the random fixtures) that is wrong. As a check against the paper's own
  statistic the store also records, at the last scale, each head's column variance summed over keys
  (HACK's sigma) and `source` reports its rank correlation with ours (Spearman 0.80 on var-shapes).
- ScaleKV layer role, per query scale. The paper: drafters spread their attention over many
  scales, refiners keep it on the current map. Its Attention Selectivity Index could not be read
  here; the official code ships precomputed drafter lists (no calibration) and scores keys by raw
  logits, neither of which we follow. Ours, from the paper's wording: a layer's share (mean over
  heads) on the earlier scales past the first two, h_k = share on scales 2..k-1, relative to even
  attention over the keys (n_2 + ... + n_{k-1}) / T_k. The first two scales are left out because
  every policy keeps them (they are 5 tokens) and they act as an attention sink here (up to 80 % of
  a head's mass on the one class-token position of scale 0): counting them made every layer of
  var-shapes a drafter at every scale. A drafter reads that history at least DRAFTER_HISTORY (0.5)
  times as much as even attention would. Scales 0-2 have no such history: every layer is a drafter
  there (the default; nothing to compress either way).
  Measured on var-shapes (16 images): layers 0, 1, 3 read 0.6-1.0x even attention from 5x5 on,
  layer 2 0.17-0.53x (a refiner from 4x4 to 13x13, a drafter again at 16x16 by 0.53).
- HeatKV segment score (S-CAS): for (layer, head, key scale s), the mean over the later query scales
  k > s of the mass one query of scale k puts on the keys of s (per query: over queries, rows and
  prompts); the last scale, which nothing reads later, scores 0. As HeatKV's calibration computes
  it, except that it averages the conditional row only and leaves its sink scales unscored; we score
  every scale and every row (guidance rows keep their own cache), and the policy decides which
  scales it protects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models.kv.dense import DenseScaleStore
from models.kv.profile import KVProfile
from models.kv.store import ScaleSpan
from models.settings import SamplingDefaults, settings_for
from models.var.model import scale_index

SINK_SCALES = 2  # HACK's N_init: the first two scales (1 + 4 tokens) a structural head keeps
FIRST_CLASSIFIED_SCALE = 3  # below it {0, 1, k} is every scale
STRUCTURAL_EXCESS = 0.5
DRAFTER_HISTORY = 0.5


class RecordingScaleStore:
    """The KVStore contract over a dense store: writes and attention go to it unchanged; each
    attend also adds the softmax mass its queries put on every key scale (fp32 probabilities from
    the stored keys, accumulated in fp64)."""

    def __init__(self, inner: DenseScaleStore, patch_nums: tuple[int, ...], depth: int, num_heads: int):
        S = len(patch_nums)
        self.inner = inner
        self.patch_nums = tuple(patch_nums)
        dev = inner.k.device
        self.key_scale = scale_index(patch_nums).to(dev)  # (L,)
        starts = torch.tensor((0, *patch_nums)).pow(2).cumsum(0)[:-1].tolist()
        self.scale_at = {start: si for si, start in enumerate(starts)}
        self.mass = torch.zeros(depth, num_heads, S, S, dtype=torch.float64, device=dev)
        self.rows = torch.zeros(depth, S, dtype=torch.int64)  # rows attended per (layer, query scale)
        self.column_var = torch.zeros(depth, num_heads, dtype=torch.float64, device=dev)  # last scale

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: ScaleSpan) -> None:
        self.inner.write(layer, k, v, at)

    def attend(self, layer: int, q: torch.Tensor, at: ScaleSpan, scale: float = 1.0) -> torch.Tensor:
        out = self.inner.attend(layer, q, at, scale=scale)
        k = self.inner.k[layer, at.rows, :, : at.end]  # (b, H, end, D)
        probs = (q.float() @ k.float().transpose(-1, -2) * scale).softmax(-1)  # (b, H, l, end)
        per_key = probs.sum(2)  # (b, H, end)
        b, H = per_key.shape[:2]
        S = len(self.patch_nums)
        per_scale = per_key.new_zeros(b, H, S).index_add_(-1, self.key_scale[: at.end], per_key)
        qs = self.scale_at[at.start]
        self.mass[layer, :, qs] += per_scale.sum(0).double()
        self.rows[layer, qs] += b
        if qs == S - 1:
            self.column_var[layer] += probs.var(2, correction=0).sum(-1).sum(0).double()
        return out

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    @property
    def working_nbytes(self) -> int:
        return self.inner.working_nbytes


# --------------------------------------------------------------------------------------------
# Derivations: pure functions of the mass tensor


def scale_sizes(patch_nums: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([pn * pn for pn in patch_nums], dtype=torch.float64)


def shares(mass: torch.Tensor) -> torch.Tensor:
    """(depth, H, S, S) mass -> the same as a distribution over key scales per query scale."""
    total = mass.sum(-1, keepdim=True)
    return mass / total.clamp_min(torch.finfo(mass.dtype).tiny)


def structural_excess(mass: torch.Tensor, patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(depth, H): mean over query scales k >= 3 of how far the share on scales {0, 1, k} stands
    from even attention over the keys (0) towards all of it (1)."""
    p, n = shares(mass.double()), scale_sizes(patch_nums)
    excess = []
    for k in range(FIRST_CLASSIFIED_SCALE, len(patch_nums)):
        f = p[:, :, k, :SINK_SCALES].sum(-1) + p[:, :, k, k]
        u = (n[:SINK_SCALES].sum() + n[k]) / n[: k + 1].sum()
        excess.append((f - u) / (1 - u))
    return torch.stack(excess, -1).mean(-1)


def head_classes(mass: torch.Tensor, patch_nums: tuple[int, ...]) -> list[list[str]]:
    e = structural_excess(mass, patch_nums)
    return [["structural" if x >= STRUCTURAL_EXCESS else "contextual" for x in row] for row in e.tolist()]


def history_ratio(mass: torch.Tensor, patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(S, depth): a layer's share (mean over heads) on the earlier scales past the sinks (2..k-1),
    over the share even attention over the keys would give them; 0 where there are none (k <= 2)."""
    p, n = shares(mass.double()), scale_sizes(patch_nums)
    S = len(patch_nums)
    ratio = torch.zeros(S, mass.shape[0], dtype=torch.float64)
    for k in range(SINK_SCALES + 1, S):
        history = p[:, :, k, SINK_SCALES:k].sum(-1).mean(1)  # (depth,)
        ratio[k] = history / (n[SINK_SCALES:k].sum() / n[: k + 1].sum())
    return ratio


def layer_roles(mass: torch.Tensor, patch_nums: tuple[int, ...]) -> list[list[str]]:
    r = history_ratio(mass, patch_nums)
    r[: SINK_SCALES + 1] = float("inf")  # no history past the sinks: nothing to compress, the default
    return [["drafter" if x >= DRAFTER_HISTORY else "refiner" for x in row] for row in r.tolist()]


def segment_scores(mass: torch.Tensor, rows: torch.Tensor, patch_nums: tuple[int, ...]) -> torch.Tensor:
    """(depth, H, S) S-CAS: the mean over query scales k > s of one query's mass on key scale s.
    rows: (depth, S) the rows that attended at each (layer, query scale)."""
    n = scale_sizes(patch_nums)
    queries = (rows.double() * n).to(mass.device)  # (depth, S): queries per (layer, query scale)
    per_query = mass.double() / queries.clamp_min(1)[:, None, :, None]  # (depth, H, k, s)
    S = len(patch_nums)
    score = torch.zeros(mass.shape[:2] + (S,), dtype=torch.float64)
    for s in range(S - 1):
        score[:, :, s] = per_query[:, :, s + 1 :, s].mean(-1).cpu()
    return score


@dataclass
class Measurement:
    """What calibration recorded: the mass tensor and the rows behind it."""

    patch_nums: tuple[int, ...]
    mass: torch.Tensor  # (depth, H, S, S) fp64, [layer, head, query scale, key scale]
    rows: torch.Tensor  # (depth, S) int64
    column_var: torch.Tensor  # (depth, H) HACK's sigma at the last scale, summed over rows
    source: dict


def calibration_classes(n: int, num_classes: int) -> list[int]:
    """n class indices spread evenly over the model's classes (all of them once n >= num_classes)."""
    return [(i * num_classes) // n if n <= num_classes else i % num_classes for i in range(n)]


def measure(
    model, vae, n: int, defaults: SamplingDefaults, batch_size: int = 8, seed: int = 0
) -> Measurement:
    """n full-cache generations (image i: seed `seed + i`, class `calibration_classes(n)[i]`, the
    model's sampling defaults) through the engine, with the recording store around its dense one."""
    from models.var.generate import generate

    c = model.cfg
    classes = calibration_classes(n, c.num_classes)
    settings = settings_for(defaults, seed, n)
    stores: list[RecordingScaleStore] = []

    def record(dense: DenseScaleStore) -> RecordingScaleStore:
        stores.append(RecordingScaleStore(dense, c.patch_nums, c.depth, c.num_heads))
        return stores[-1]

    for i in range(0, n, batch_size):
        generate(
            model,
            vae,
            classes[i : i + batch_size],
            settings[i : i + batch_size],
            decode=False,
            wrap_store=record,
        )
    mass = sum(s.mass for s in stores).cpu()
    rows = sum(s.rows for s in stores)
    column_var = sum(s.column_var for s in stores).cpu()
    source = {
        "images": n,
        "seeds": [seed, seed + n - 1],
        "classes": classes,
        "cfg": defaults.cfg,
        "top_k": defaults.top_k,
        "top_p": defaults.top_p,
        "temperature": defaults.temperature,
        "guidance_rows": "counted as rows of their own" if defaults.cfg != 0 else "none (cfg 0)",
    }
    return Measurement(tuple(c.patch_nums), mass, rows, column_var, source)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def derive(m: Measurement) -> KVProfile:
    depth, H = m.mass.shape[:2]
    excess = structural_excess(m.mass, m.patch_nums)
    history = history_ratio(m.mass, m.patch_nums)
    classes = head_classes(m.mass, m.patch_nums)
    roles = layer_roles(m.mass, m.patch_nums)
    scores = segment_scores(m.mass, m.rows, m.patch_nums)
    source = {
        **m.source,
        "head_class": (
            "HACK-style, from per-scale attention: mean over query scales k >= 3 of "
            "(share on scales {0, 1, k} - u_k) / (1 - u_k), u_k that share under even attention over "
            f"the keys; structural if >= {STRUCTURAL_EXCESS}"
        ),
        "structural_excess": [[round(x, 4) for x in row] for row in excess.tolist()],
        "hack_sigma_last_scale": [
            [round(x, 4) for x in row] for row in (m.column_var / m.rows[:, -1:]).tolist()
        ],
        "spearman_excess_vs_hack_sigma": round(spearman(excess, m.column_var), 4),
        "layer_role": (
            "ScaleKV's criterion as the paper words it (not the official code's logit scores): per query "
            "scale, a layer's share (mean over heads) on earlier scales over the share even attention "
            f"over the keys gives them; drafter if >= {DRAFTER_HISTORY}; scale 0: every layer a drafter"
        ),
        "history_ratio": [[round(x, 4) for x in row] for row in history.tolist()],
        "segment_score": (
            "HeatKV's S-CAS: mean over later query scales of one query's mass on the key scale "
            "(over queries, rows and images; guidance rows included); 0 for the last scale"
        ),
    }
    return KVProfile(
        m.patch_nums,
        depth,
        H,
        tuple(tuple(r) for r in classes),
        tuple(tuple(r) for r in roles),
        tuple(tuple(tuple(round(x, 6) for x in s) for s in h) for h in scores.tolist()),
        source,
    )


def calibrate(spec, n: int = 16) -> KVProfile:
    """Load a next-scale model from its ModelSpec, measure n images, derive its profile."""
    from models.var.loading import load_var

    model, vae = load_var(spec.weights, spec.tokenizer, spec.device, spec.dtype)
    profile = derive(measure(model, vae, n, spec.defaults))
    return replace(profile, source={"model": spec.name, **profile.source})


def summary(profile: KVProfile) -> str:
    """The short table the CLI prints: head classes per layer, drafter share per query scale."""
    lines = ["layer  structural  heads (S structural, c contextual)"]
    for layer, row in enumerate(profile.head_class):
        marks = "".join("S" if c == "structural" else "c" for c in row)
        count = f"{row.count('structural')}/{len(row)}"
        lines.append(f"{layer:>5}  {count:>10}  {marks}")
    lines.append("scale   size  drafters  drafter layers")
    for si, (pn, row) in enumerate(zip(profile.patch_nums, profile.layer_role, strict=True)):
        drafters = [str(i) for i, r in enumerate(row) if r == "drafter"]
        share = f"{len(drafters)}/{len(row)}"
        lines.append(f"{si:>5}  {f'{pn}x{pn}':>5}  {share:>8}  {' '.join(drafters) or '-'}")
    return "\n".join(lines)
