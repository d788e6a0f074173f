"""Speculative decoding's pieces for the step engine (models/llamagen/generate.py): drafts, their
verification and the `auto` window, with no draft model (the model's own outputs are the drafts).

A speculative sequence holds committed tokens and drafts after them. The engine's pass feeds every
row its newest committed token and its drafts (`decode_step` with S = the widest window, each row
at its own positions); column t of the output is the target p_t of the token at offset t, so the
drafts are verified in parallel:

- SJD (speculative Jacobi decoding, Teng et al. 2024): accept draft d_t with min(1, p_t(d)/q_t(d)),
  q_t being the distribution d_t was drawn from; at the first rejection draw that token from the
  residual norm(max(0, p_t - q_t)); if all pass, the last column's p gives one more token. The
  outputs of the later columns, drawn from their (not yet exact) p, are the next iteration's
  drafts with q = p: Jacobi iteration, drafts that mature as their prefix settles.
- SCD (speculative coupled decoding, So et al. 2025): as SJD, but every later draft is also tested
  and, when rejected, resampled from its residual, so the next drafts are a maximal coupling of q
  and p: a draft that still fits its new target is kept as it was and tends to be accepted next
  time. The committed prefix still ends at the first rejection.
- GSD (grouped speculative decoding, So et al. 2025): a test that sums p and q over a dynamic
  group of near-equivalent tokens (the draft's neighbours in the target's ranking with a close
  probability and a close input embedding): min(1, sum_G p / sum_G q). Lossy by design; the
  residual after a rejection is SJD's, and the drafts are refreshed as SCD's (see COUPLED).

SJD and SCD sample exactly the model's distribution: p and q are both the warped distributions
(cfg mix, then top-k, temperature, top-p, as plain decoding samples), and the residual is not
warped again (the official code re-applies top-k/top-p to it, which is exact for top-k only).
Fresh drafts copy the token one grid row up (or to the left on the first row), a function of the
committed and drafted tokens, so their q is one-hot. Every draw of a sequence comes from its own
generator, a fixed number per pass for its window, so its tokens do not depend on its batch for a
given window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from kernels import speculative as kernels
from models.kv.paged import BLOCK_SIZE, BlockPool, PagedTokenStore
from models.llamagen.model import GPT
from models.llamagen.window_profile import WindowProfile
from models.runtime import device_clock
from models.sampling import SamplerRows
from models.settings import MAX_WINDOW, Speculative

WINDOWS = (1, 2, 4, 8, 16, 32)  # what `auto` chooses from; 1 is plain decoding
CALIBRATION = WINDOWS[1:]
EMA = 0.1  # weight of a new image's tokens per pass in auto's running mean
# A width's pass cost is the mean of its timed passes, its first estimate counting as PRIOR_PASSES of
# them, and after PASS_MEMORY a running mean of that span (about 1000 passes, four plain images or a
# dozen at window 16): passes dear late in an image (their attention reads the most keys) and cheap
# at its end (narrow windows) then weigh as in the image. A running mean of weight 0.1 reflected
# the last ~10 passes, the end of the last image: on the t2i model it put window 4 at 0.41 ms
# against the 0.53 ms its passes took on average, and `auto` chose windows that lost 6 % against
# plain decoding (0.94x [0.89, 0.97] at batch 1).
PRIOR_PASSES = 16
PASS_MEMORY = 128
# The machine's speed moves with its neighbours, for every width and row count alike. At most
# once every PROBE_EVERY_S, as a choice is made or a pass recorded, `probe` times PROBES plain
# forwards of one row (the median, on a store of its own) against the first such probe, and
# passes are counted at the speed so measured: a width's estimate then compares with the others'
# however busy the minute each was timed in. Without it a width that ran through a slow spell was
# judged against stale estimates of the others: plain passes measured 0.25 ms in a quiet minute and
# 0.37 ms in a busy one, window 4's estimate stayed at its quiet 0.6 ms, and `auto` switched to
# window 4 for half its images, 0.77-0.87x of plain decoding at batch 1. (The pass times alone
# cannot tell a slow machine from a dear width.)
PROBES = 3
# Widths are compared at one speed, so a probe only places the passes that follow it: one a second
# tracks a neighbour's minutes (a probe at every choice, of the choice's rows, cost 1 % of a
# batch-8 batch).
PROBE_EVERY_S = 1.0
TIME_EVERY = 8  # the engine times one pass in this many for auto (every pass of a calibration image)
# Speculation must promise 25 % more tokens per second than plain decoding to be chosen: a window's
# cost is first known from the calibration image and then followed as it runs, and on the bundled
# models its passes in use came out up to 40 % dearer than calibrated (4.6 against 6.5 ms at
# window 16), so a 10 % margin let `auto` lose up to 16 % against plain decoding before it learned.
MARGIN = 1.25
# Methods whose later drafts are coupled to their new targets. GSD's own code refreshes drafts as
# SJD does; coupling them too took the bundled c2i model from 77 to 71 passes per image at window 16
# and from 69 to 56 at window 32 (8 images; a fresh draft copying the token above rather than the
# one to the left saved another 5 %).
COUPLED = ("scd", "gsd")


def target_probs(logits: torch.Tensor, sampler: SamplerRows) -> torch.Tensor:
    """logits (B, S, V) float32 -> (B, S, V) the distribution plain decoding samples from: the same
    candidates as models.sampling.sample (top-k, temperature, then top-p), renormalised."""
    plan = sampler.plan(logits.shape[-1])
    return kernels.target_probs(logits, sampler.top_k, sampler.temperature, sampler.top_p, plan)


class TokenGroups:
    """GSD's groups: the `group` tokens either side of the draft in the target's ranking whose
    probability is within `p_threshold` of the draft's and whose squared input-embedding distance
    to it is within `distance` x the mean over token pairs (kernels/speculative.py: grouped_ratio).
    (The official slice takes 7 below and 6 above; ours is symmetric, a draft near the end of the
    ranking keeps the neighbours it has rather than being rejected, and ties rank by index.)"""

    def __init__(self, model: GPT):
        e = model.tok_embeddings.weight.detach().float()
        self.embeddings = e
        # E|e_i - e_j|^2 over token pairs: the distance threshold is relative to it
        self.mean_sq = float(2 * (e.pow(2).sum(-1).mean() - e.mean(0).pow(2).sum()))

    def ratio(
        self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, knobs: list[Speculative]
    ) -> torch.Tensor:
        """p, q: (b, S, V); drafts: (b, S); knobs: each row's settings -> (b, S) min(1, sum_G p / sum_G q)."""
        device = p.device
        half = torch.tensor([s.group for s in knobs], device=device)
        p_thr = torch.tensor([s.p_threshold for s in knobs], device=device)
        d_thr = torch.tensor([s.distance * self.mean_sq for s in knobs], device=device)
        max_half = max(s.group for s in knobs)  # from the host: the reference reads nothing back
        return kernels.grouped_ratio(p, q, drafts, self.embeddings, half, p_thr, d_thr, max_half)


class AutoWindow:
    """What `auto` chooses from, per model (the runner keeps one): the seconds a pass of window L
    over R rows takes, and the tokens a pass of window L commits per image, per method.

    Seconds start from one measured verification forward per (R, L) (a fresh store, positions in
    the middle of the image, the median of `repeats`) plus R times the width's calibrated overhead
    per row (drafting, verification or sampling, and the step's glue; plain decoding's too), and then
    follow the engine's own passes (their mean over the last PASS_MEMORY), each counted at the
    machine's speed of the moment (`load`, which `probe` measures: PROBES). Tokens per pass are
    calibrated on the first `auto` image of a method: that image is run once at each window, alone
    (a few seconds, once per model), and then follow every auto image run at that window. An auto
    image takes, at its first decode pass and for all its passes (drafts mature over passes at one window,
    so switching would cost acceptance), the window with the most tokens per second of the pass it
    joins, its company included; L = 1 (plain decoding) commits one token a pass and wins unless a
    window promises MARGIN more."""

    def __init__(self, model: GPT, repeats: int = 7, profile: WindowProfile | None = None):
        """profile: tokens per pass and overheads calibrated offline (`varserve calibrate`); its
        methods then need no calibration at their first image."""
        self.model, self.repeats = model, repeats
        self.forward: dict[int, dict[int, float]] = {}
        self.seconds: dict[tuple[int, int], float] = {}
        self.passes: dict[tuple[int, int], int] = {}  # passes recorded per (rows, width), prior included
        self.tokens: dict[tuple[str, int], float] = {}
        self.overhead: dict[int, float] = {}  # seconds per row a pass of width L adds to its forward
        self.calibration_images: dict[str, int] = {}
        # the machine's speed at the last probe against the first (2: half as fast); estimates and
        # forwards are kept at speed 1, and pass_seconds scales them all alike
        self.load = 1.0
        self._probe_ref: float | None = None
        self._probe_inputs: tuple | None = None
        self._probed_at = -math.inf
        self._calibration_passes: dict[tuple[int, int], list[float]] | None = None  # while calibrating
        if profile is not None:
            if profile.image_tokens != model.config.block_size:
                raise ValueError(
                    f"a window profile of a {profile.image_tokens}-token model, not {model.config.block_size}"
                )
            for method, per_window in profile.tokens_per_pass.items():
                if sorted(per_window) != list(CALIBRATION):
                    raise ValueError(
                        f"tokens_per_pass.{method} covers windows {sorted(per_window)}, not {list(CALIBRATION)}"
                    )
                self.tokens.update({(method, L): t for L, t in per_window.items()})
            # profiles written before plain passes were calibrated lack window 1 (taken as 0)
            if sorted(profile.overhead_s) not in (list(WINDOWS), list(CALIBRATION)):
                raise ValueError(
                    f"overhead_s covers windows {sorted(profile.overhead_s)}, not {list(WINDOWS)}"
                )
            self.overhead.update(profile.overhead_s)

    def pass_seconds(self, rows: int, L: int) -> float:
        """The seconds a pass of width L over `rows` rows takes at the machine's speed now."""
        return self._estimate(rows, L) * self.load

    def _estimate(self, rows: int, L: int) -> float:
        """The same at speed 1 (what the widths are compared by)."""
        if (rows, L) not in self.seconds:
            # until passes of this shape have run: the forward, plus the verification's own cost as
            # the calibration measured it, per row
            self.seconds[rows, L] = self._forward(rows)[L] + self.overhead.get(L, 0.0) * rows
        return self.seconds[rows, L]

    def _forward(self, rows: int) -> dict[int, float]:
        """The verification forward of each width over `rows` rows, at speed 1: measured once, at
        the speed last probed."""
        if rows not in self.forward:
            self._probe_when_due()
            self.forward[rows] = {L: t / self.load for L, t in self._measure(rows).items()}
        return self.forward[rows]

    @property
    def calibrating(self) -> bool:
        """Running a calibration image, whose every pass counts."""
        return self._calibration_passes is not None

    def tokens_per_pass(self, method: str, L: int) -> float:
        return 1.0 if L == 1 else self.tokens[method, L]

    def calibrated(self, method: str) -> bool:
        return all((method, L) in self.tokens for L in CALIBRATION)

    def record_pass(self, rows: int, L: int, seconds: float) -> None:
        if self._calibration_passes is not None:  # the calibration sets the width's estimate anew
            self._calibration_passes.setdefault((rows, L), []).append(seconds)
            return
        self._probe_when_due()
        old = self._estimate(rows, L)
        n = self.passes.get((rows, L), PRIOR_PASSES) + 1
        self.passes[rows, L] = min(n, PASS_MEMORY)
        self.seconds[rows, L] = old + (seconds / self.load - old) / min(n, PASS_MEMORY)

    def record_tokens(self, method: str, L: int, tokens: list[float]) -> None:
        for t in tokens:
            old = self.tokens.get((method, L), t)
            self.tokens[method, L] = old + EMA * (t - old)

    def ragged_seconds(self, rows: int, width: int, tokens: int) -> float:
        """The seconds a ragged pass of `tokens` real tokens over `rows` rows, `width` wide, takes:
        a pass runs only its real tokens through the layers, so between a plain pass (rows tokens)
        and a full one (rows x width) its cost is interpolated by its tokens. Where a pass is
        compute-bound (a CPU) that counts its tokens; where it is memory-bound (a GPU) the two
        ends are alike and so is every pass between them."""
        plain = self.pass_seconds(rows, 1)
        if width == 1:
            return plain
        full = self.pass_seconds(rows, width)
        return plain + (full - plain) * (tokens - rows) / (rows * (width - 1))

    def choose(
        self,
        rows: int,
        methods: list[str],
        floor: int,
        others: int = 0,
        auto_rows: int | None = None,
        company_tokens: int = 0,
    ) -> int:
        """The window for the auto images of a pass (their methods), beside images already decoding
        at their own windows that make the pass at least `floor` wide; `others` of those commit
        about one token a pass (plain decoding), so a window that slows the pass must pay for
        their lost time too. auto_rows: the auto images' rows, the others' putting
        `company_tokens` tokens a pass through the layers: the pass is ragged and costs its tokens
        (`ragged_seconds`); None: every row counts at the pass's width."""
        self._probe_when_due()

        def rate(L: int) -> float:
            width = min(w for w in WINDOWS if w >= max(L, floor))
            tokens = sum(self.tokens_per_pass(m, L) for m in methods) + others
            if auto_rows is None:
                seconds = self.pass_seconds(rows, width)
            else:
                seconds = self.ragged_seconds(rows, width, auto_rows * L + company_tokens)
            return tokens / seconds / (MARGIN if L > 1 and floor == 1 else 1.0)

        return max(WINDOWS, key=rate)

    def calibrate(self, settings, run_alone: Callable[[object], tuple[int, int]]) -> None:
        """settings: an auto image's ImageSettings; run_alone(settings) generates one image of
        these settings alone with this AutoWindow (which records its passes) -> (forward passes, rows).
        Called again for a method (`varserve calibrate`), it averages over the images.

        The image runs at every window, plain decoding's (1) included: a width's overhead is the mean
        of its passes over the image less the forward measured at mid-image, for plain passes too
        (sampling and the step's glue), so that every width's first estimate is counted alike: a
        plain pass counted as its bare forward made `auto` choose plain decoding where windows won.
        The mean, not the running mean, which weighs the image's last passes, whose attention reads
        the most keys. The width's seconds at these rows restart from that estimate."""
        method = settings.speculative.method
        n = self.calibration_images.get(method, 0)
        k = sum(self.calibration_images.values())  # images calibrated before, any method
        for L in WINDOWS:
            self._calibration_passes = {}
            try:
                passes, rows = run_alone(
                    replace(settings, speculative=replace(settings.speculative, window=L))
                )
                times = self._calibration_passes.get((rows, L), [])
            finally:
                self._calibration_passes = None
            if L > 1:  # its tokens per pass give the window's start value (the prefill pass drew one)
                tokens = (self.model.config.block_size - 1) / (passes - 1)
                self.tokens[method, L] = (self.tokens.get((method, L), 0.0) * n + tokens) / (n + 1)
            if not times:
                continue
            self._probe_when_due()  # about the speed these passes ran at
            forward = self._forward(rows)[L]
            overhead = max(0.0, sum(times) / len(times) / self.load - forward) / rows
            self.overhead[L] = (self.overhead.get(L, 0.0) * k + overhead) / (k + 1) if k else overhead
            self.seconds[rows, L] = forward + self.overhead[L] * rows
            self.passes.pop((rows, L), None)  # a fresh estimate, worth PRIOR_PASSES passes again
        self.calibration_images[method] = n + 1

    def profile(self, source: dict) -> WindowProfile:
        """What calibration measured, for a file."""
        per_method: dict[str, dict[int, float]] = {}
        for (method, L), t in sorted(self.tokens.items()):
            per_method.setdefault(method, {})[L] = round(t, 4)
        overhead = {L: round(s, 7) for L, s in sorted(self.overhead.items())}
        return WindowProfile(self.model.config.block_size, per_method, overhead, source)

    def _store(self, rows: int) -> tuple[PagedTokenStore, int]:
        """A paged store of its own for timing passes over `rows` rows (the engine's layout, every row
        holding its blocks) -> (store, start): positions from `start` on, mid-image, are free."""
        c, w = self.model.config, self.model.tok_embeddings.weight
        start = c.cls_token_num + c.block_size // 2
        per_row = -(-(start + MAX_WINDOW) // BLOCK_SIZE)
        pool = BlockPool(c.n_layer, rows * per_row, c.n_kv_head, BLOCK_SIZE, c.head_dim, w.dtype, w.device)
        store = PagedTokenStore(pool, start + MAX_WINDOW)
        store.set_rows([[] for _ in range(rows)])
        for row in range(rows):
            store.grow(row, start + MAX_WINDOW)
        return store, start

    @torch.inference_mode()
    def _measure(self, rows: int) -> dict[int, float]:
        """One verification forward per window, in `repeats` interleaved rounds, the median of
        each: on a shared machine a neighbour's burst then slows every window alike instead of
        the one being timed."""
        device = self.model.tok_embeddings.weight.device
        store, start = self._store(rows)
        inputs = {
            L: (
                torch.zeros(rows, L, dtype=torch.long, device=device),
                (start + torch.arange(L, device=device)).expand(rows, L),
            )
            for L in WINDOWS
        }
        times: dict[int, list[float]] = {L: [] for L in WINDOWS}
        for round_ in range(self.repeats + 1):
            for L, (tokens, positions) in inputs.items():
                t0 = device_clock(device)
                self.model.decode_step(tokens, positions, store)
                if round_:  # the first round warms up
                    times[L].append(device_clock(device) - t0)
        return {L: sorted(t)[len(t) // 2] for L, t in times.items()}

    def _probe_when_due(self) -> None:
        if time.monotonic() - self._probed_at >= PROBE_EVERY_S:
            self.probe()

    @torch.inference_mode()
    def probe(self) -> None:
        """Sets `load`, the machine's speed now: the median of PROBES plain forwards of one row
        against the first probe's (their store, one row's blocks, is kept: a probe allocates
        nothing)."""
        device = self.model.tok_embeddings.weight.device
        if self._probe_inputs is None:
            store, start = self._store(1)
            tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
            self._probe_inputs = (tokens, torch.full((1, 1), start, device=device), store)
            self.model.decode_step(*self._probe_inputs)  # warm-up
        times = []
        for _ in range(PROBES):
            t0 = device_clock(device)
            self.model.decode_step(*self._probe_inputs)
            times.append(device_clock(device) - t0)
        t = max(sorted(times)[len(times) // 2], 1e-9)  # a clock too coarse to see it reads 0
        if self._probe_ref is None:
            self._probe_ref = t
        self.load = t / self._probe_ref
        self._probed_at = time.monotonic()


def window_flops(model: GPT, rows: int, S: int, keys: int) -> float:
    """Matmul FLOPs of one pass of S tokens per row over about `keys` cached positions."""
    c = model.config
    kv_dim = c.n_kv_head * c.head_dim
    per_token = c.n_layer * (c.dim * (c.dim + 2 * kv_dim) + c.dim * c.dim + 3 * c.dim * c.ffn_hidden)
    attn = c.n_layer * 2 * c.dim * (keys + S)
    return 2.0 * rows * S * (per_token + c.dim * c.vocab_size + attn)
