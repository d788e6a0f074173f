"""Speculative decoding on the step engine: several image tokens per forward pass, per sequence,
with no draft model (the model's own outputs are the drafts).

Each sequence holds committed tokens and a window of drafts after them. One forward pass feeds
every row its newest committed token and its drafts (`decode_step` with S = window, each row at
its own positions); column t of the output is the target p_t of the token at offset t, so the
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
generator, a fixed number per iteration for its window, so its tokens do not depend on its batch
for a given window. A sequence without speculation runs in the same batch at window 1 through the
plain sampler, drawing as plain decoding draws.

Guidance: a guided image's null row reads the same drafts at the same positions; one token is
drawn from the mixed logits for both. Rows advance by their own accepted lengths; the dense store
holds every position, so a rejected draft's keys are simply overwritten by a later pass. Columns
beyond a row's window are padding at a scratch position past the longest sequence, which no real
query reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from models.kv.paged import PagedTokenStore
from models.llamagen.generate import Engine, Sequence, batch_pool
from models.llamagen.model import GPT
from models.runtime import device_clock
from models.sampling import SamplerRows
from models.settings import MAX_WINDOW

WINDOWS = (1, 2, 4, 8, 16, 32)  # what `auto` chooses from; 1 is plain decoding
CALIBRATION = WINDOWS[1:]
EMA = 0.1  # weight of a new measurement in auto's running means
MARGIN = 1.1  # speculation must promise 10 % more tokens per second than plain decoding to be chosen
# Methods whose later drafts are coupled to their new targets. GSD's own code refreshes drafts as
# SJD does; coupling them too took the bundled c2i model from 77 to 71 passes per image at window 16
# and from 69 to 56 at window 32 (8 images; a fresh draft copying the token above rather than the
# one to the left saved another 5 %).
COUPLED = ("scd", "gsd")


def target_probs(logits: torch.Tensor, sampler: SamplerRows) -> torch.Tensor:
    """logits (B, S, V) float32 -> (B, S, V) the distribution plain decoding samples from: the same
    candidates as models.sampling.sample (top-k, temperature, then top-p), renormalised."""
    B, S, V = logits.shape
    k = torch.tensor([min(k, V) if k > 0 else V for k in sampler.top_k_values], device=logits.device)
    cand_logits, cand_idx = logits.topk(int(k.max()), dim=-1, sorted=True)
    rank = torch.arange(cand_logits.shape[-1], device=logits.device)
    cand_logits = cand_logits.masked_fill(rank >= k.view(B, 1, 1), -torch.inf)
    probs = (cand_logits / sampler.temperature.clamp(min=1e-5).view(B, 1, 1)).softmax(-1)
    top_p = sampler.top_p.view(B, 1, 1)
    use_p = (top_p > 0) & (top_p < 1)
    if bool(use_p.any()):
        drop = use_p & (probs.cumsum(-1) - probs >= top_p)
        drop[..., 0] = False
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, cand_idx, probs)


def race(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A draw from the categorical proportional to `weights` (..., V) (unnormalised, >= 0) with
    uniform noise (..., V): the exponential race plain decoding runs, argmax w / E, E ~ Exp(1)."""
    return (weights / -torch.log1p(-uniform)).argmax(-1)


class AutoWindow:
    """What `auto` chooses from, per model (the runner keeps one): the seconds a pass of window L
    over R rows takes, and the tokens a pass of window L commits per image, per method.

    Seconds start from one measured verification forward per (R, L) (a fresh store, positions in
    the middle of the image, the median of `repeats`) and then follow the engine's own passes (a running
    mean, so the verification's own cost counts too). Tokens per pass are calibrated on the first
    `auto` image of a method: that image is run once at each window of CALIBRATION, alone (a few
    seconds, once per model), and then follow every auto image run at that window. A batch takes,
    at its first pass and for all its passes (drafts mature over passes at one window, so switching
    would cost acceptance), the window with the most tokens per second; L = 1 (plain decoding)
    commits one token a pass and wins unless a window promises MARGIN more."""

    def __init__(self, model: GPT, repeats: int = 7):
        self.model, self.repeats = model, repeats
        self.forward: dict[int, dict[int, float]] = {}
        self.seconds: dict[tuple[int, int], float] = {}
        self.tokens: dict[tuple[str, int], float] = {}
        self.overhead: dict[int, float] = {}  # seconds per row a pass of width L adds to its forward

    def pass_seconds(self, rows: int, L: int) -> float:
        if (rows, L) not in self.seconds:
            if rows not in self.forward:
                self.forward[rows] = self._measure(rows)
            # until passes of this shape have run: the forward, plus the verification's own cost as
            # the calibration measured it, per row
            self.seconds[rows, L] = self.forward[rows][L] + self.overhead.get(L, 0.0) * rows
        return self.seconds[rows, L]

    def tokens_per_pass(self, method: str, L: int) -> float:
        return 1.0 if L == 1 else self.tokens[method, L]

    def calibrated(self, method: str) -> bool:
        return all((method, L) in self.tokens for L in CALIBRATION)

    def record_pass(self, rows: int, L: int, seconds: float) -> None:
        old = self.pass_seconds(rows, L)
        self.seconds[rows, L] = old + EMA * (seconds - old)

    def record_tokens(self, method: str, L: int, tokens: list[float]) -> None:
        for t in tokens:
            old = self.tokens.get((method, L), t)
            self.tokens[method, L] = old + EMA * (t - old)

    def choose(self, rows: int, methods: list[str], floor: int) -> int:
        """The window for the auto images of a pass (their methods), beside fixed-window images
        that make the pass at least `floor` wide."""

        def rate(L: int) -> float:
            width = min(w for w in WINDOWS if w >= max(L, floor))
            gain = sum(self.tokens_per_pass(m, L) for m in methods) / self.pass_seconds(rows, width)
            return gain / (MARGIN if L > 1 and floor == 1 else 1.0)

        return max(WINDOWS, key=rate)

    def calibrate(self, seq: Sequence) -> None:
        method = seq.settings.speculative.method
        for L in CALIBRATION:
            settings = replace(seq.settings, speculative=replace(seq.settings.speculative, window=L))
            engine = SpeculativeEngine(
                self.model, [replace(seq, settings=settings, generator=None, n=0, forward_passes=0)], self
            )
            while not engine.done:
                engine.step()
            # the engine recorded its pass times; its tokens per pass give the window's start value
            self.tokens[method, L] = (self.model.config.block_size - 1) / (engine.counts.passes[0] - 1)
            rows = engine.base.rows.count
            if rows not in self.forward:
                self.forward[rows] = self._measure(rows)
            self.overhead[L] = max(0.0, self.seconds[rows, L] - self.forward[rows][L]) / rows

    @torch.inference_mode()
    def _measure(self, rows: int) -> dict[int, float]:
        """One verification forward per window, in `repeats` interleaved rounds, the median of
        each: on a shared machine a neighbour's burst then slows every window alike instead of
        the one being timed."""
        c, device = self.model.config, self.model.tok_embeddings.weight.device
        start = c.cls_token_num + c.block_size // 2
        # the engine's own store: paged, every row holding its blocks
        pool = batch_pool(self.model, [], max_len=start + MAX_WINDOW, rows=rows)
        store = PagedTokenStore(pool, start + MAX_WINDOW)
        store.set_rows([[] for _ in range(rows)])
        for row in range(rows):
            store.grow(row, start + MAX_WINDOW)
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


@dataclass
class SpeculativeCounts:
    """Per image: forward passes it took part in, drafts verified, drafts accepted."""

    passes: list[int]
    drafted: list[int]
    accepted: list[int]
    flops: float = 0.0
    seconds: float = field(default=0.0, repr=False)


class SpeculativeEngine:
    """The sequences of a batch decoded speculatively (a sequence with method "none" at window 1).
    `step()` is one forward pass for every unfinished row: the prefill first, then one verification
    pass of each row's window."""

    def __init__(self, model: GPT, seqs: list[Sequence], auto: AutoWindow | None = None):
        c = model.config
        self.model, self.seqs, self.auto = model, seqs, auto
        # a static batch over a pool of its own, every row holding its blocks (and the scratch
        # position) from the start: a window may write anywhere up to its end
        max_len = c.max_seq_len + 1
        self.base = Engine(model, batch_pool(model, seqs, max_len=max_len), max_len=max_len)
        self.scratch = c.max_seq_len  # padding columns write here; no real query reads past it
        self.started = False
        B, N, V = len(seqs), c.block_size, c.vocab_size
        device = model.tok_embeddings.weight.device
        self.device, self.N, self.V = device, N, V
        self.methods = [s.settings.speculative.method for s in seqs]
        self.fixed = [
            1
            if m == "none"
            else (None if s.settings.speculative.window == "auto" else s.settings.speculative.window)
            for m, s in zip(self.methods, seqs, strict=True)
        ]  # None: auto
        self.wmax = max(MAX_WINDOW if w is None else w for w in self.fixed)
        self.buf = torch.zeros(B, N + self.wmax, dtype=torch.long, device=device)  # committed, then drafts
        self.q = torch.zeros(B, self.wmax, V, device=device)  # the draft distributions, by offset
        self.n = [0] * B  # committed tokens
        self.drafts = [0] * B  # drafts held after them
        self.counts = SpeculativeCounts([0] * B, [0] * B, [0] * B)
        self.chosen = 0  # the window of the batch's auto images, chosen at its first decode pass
        self.forward_passes = 0
        self.spec = [b for b, m in enumerate(self.methods) if m != "none"]
        self.gsd = [b for b in self.spec if self.methods[b] == "gsd"]
        if self.gsd:
            e = model.tok_embeddings.weight.float()
            self.embeddings = e
            # E|e_i - e_j|^2 over token pairs: GSD's distance threshold is relative to it
            self.mean_sq = float(2 * (e.pow(2).sum(-1).mean() - e.mean(0).pow(2).sum()))

    @property
    def done(self) -> bool:
        return self.started and min(self.n) == self.N

    @property
    def tokens(self) -> torch.Tensor:
        return self.buf[:, : self.N]

    def step(self) -> None:
        if not self.started:
            self.base.add(self.seqs)  # prefill and image token 0, as plain decoding draws it
            for row in range(self.base.rows.count):
                self.base.store.grow(row, self.base.max_len)
            self.buf[:, 0] = self.base.tokens[:, 0]
            self.started = True
            self.n = [1] * len(self.seqs)
            self._count_pass(range(len(self.seqs)), 1)
            return
        active = [b for b, n in enumerate(self.n) if n < self.N]
        windows = self._windows(active)
        S = max(windows.values())
        t0 = device_clock(self.device)
        self._fill_drafts(windows)
        tokens, positions = self._inputs(windows, S)
        logits = self.model.decode_step(tokens, positions, self.base.store, self.base.rows.key_valid)
        cond = self._guide(logits, S)  # (B, S, V)
        # a row at window 1 is plain decoding, drawn as plain decoding draws
        plain = [b for b in active if windows[b] == 1]
        if plain:
            rows = torch.tensor(plain, device=self.device)
            picked = _rows_of(self.base.rows.sampler, rows).sample(cond[rows, :1])[:, 0].tolist()
            for b, token in zip(plain, picked, strict=True):
                self.buf[b, self.n[b]] = token
                self.n[b] += 1
                self.drafts[b] = 0
        spec = [b for b in active if windows[b] > 1]
        if spec:
            self._verify(spec, windows, cond, S)
        if self.auto is not None:  # every pass measures the cost of its width
            self.auto.record_pass(
                self.base.rows.count, min(w for w in WINDOWS if w >= S), device_clock(self.device) - t0
            )
            for b in active:  # an auto image just done: its tokens per pass at the batch's window
                if self.fixed[b] is None and self.chosen > 1 and self.n[b] == self.N:
                    self.auto.record_tokens(
                        self.methods[b], self.chosen, [(self.N - 1) / self.counts.passes[b]]
                    )
        self._count_pass(active, S)

    # -- windows and inputs -----------------------------------------------------------------------

    def _windows(self, active: list[int]) -> dict[int, int]:
        """Each active row's window this pass: its own, or for `auto` rows one shared choice, the
        window that maximises the tokens expected per second of the whole pass."""
        left = {b: self.N - self.n[b] for b in active}
        out = {b: min(self.fixed[b], left[b]) for b in active if self.fixed[b] is not None}
        auto = [b for b in active if self.fixed[b] is None]
        if auto and not self.chosen:
            if self.auto is None:
                self.auto = AutoWindow(self.model)
            for b in auto:
                if not self.auto.calibrated(self.methods[b]):
                    self.auto.calibrate(self.seqs[b])
            floor = max(out.values(), default=1)  # the pass is at least this wide anyway
            self.chosen = self.auto.choose(self.base.rows.count, [self.methods[b] for b in auto], floor)
        out.update({b: min(self.chosen, left[b]) for b in auto})
        return out

    def _fill_drafts(self, windows: dict[int, int]) -> None:
        """Tops each speculative row up to window - 1 drafts: a fresh draft copies the token one
        grid row up (the row before on the first row: its left neighbour), with a one-hot q."""
        grid = self.model.config.grid_size
        need = [(b, self.drafts[b], windows[b] - 1) for b in self.spec if b in windows]
        need = [(b, lo, hi) for b, lo, hi in need if lo < hi]
        if not need:
            return
        rows = torch.tensor([b for b, _, _ in need], device=self.device)
        lo = torch.tensor([x for _, x, _ in need], device=self.device)
        hi = torch.tensor([x for _, _, x in need], device=self.device)
        n = torch.tensor([self.n[b] for b, _, _ in need], device=self.device)
        for t in range(min(x for _, x, _ in need), max(x for _, _, x in need)):
            fill = (t >= lo) & (t < hi)
            pos = n + t
            src = torch.where(pos >= grid, pos - grid, pos - 1)
            tok = torch.where(fill, self.buf[rows, src], self.buf[rows, pos])
            self.buf[rows, pos] = tok
            one_hot = torch.nn.functional.one_hot(tok, self.V).float()
            self.q[rows, t] = torch.where(fill[:, None], one_hot, self.q[rows, t])
        for b, _, hi_b in need:
            self.drafts[b] = hi_b

    def _inputs(self, windows: dict[int, int], S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, S) tokens and positions: each row's newest committed token and its drafts at
        their positions, the rest padding at the scratch position; null rows copy their image's."""
        B, T = len(self.seqs), self.model.config.cls_token_num
        n = torch.tensor(self.n, device=self.device)
        L = torch.tensor([windows.get(b, 0) for b in range(B)], device=self.device)
        t = torch.arange(S, device=self.device)
        at = (n[:, None] - 1 + t).clamp(max=self.buf.shape[1] - 1)  # (B, S) token index
        valid = t < L[:, None]
        tokens = torch.where(valid, self.buf.gather(1, at), 0)
        positions = torch.where(valid, T + at, self.scratch)
        null = self.base.rows.null_of
        return torch.cat([tokens, tokens[null]]), torch.cat([positions, positions[null]])

    def _guide(self, logits: torch.Tensor, S: int) -> torch.Tensor:
        """(rows, S, V) -> (B, S, V): uncond + cfg * (cond - uncond) for guided images, with each
        column's own token's cfg (cfg_interval)."""
        B = len(self.seqs)
        cond = logits[:B]
        null = self.base.rows.null_of
        if len(null):
            n = torch.tensor(self.n, device=self.device)[null]
            token = (n[:, None] + torch.arange(S, device=self.device)).clamp(max=self.N - 1)
            scale = self.base.rows.cfg_table.gather(1, token)[..., None]  # (G, S, 1)
            cond = cond.index_copy(0, null, torch.lerp(logits[B:], cond[null], scale))
        return cond

    # -- verification -----------------------------------------------------------------------------

    def _verify(self, spec: list[int], windows: dict[int, int], cond: torch.Tensor, S: int) -> None:
        device, V = self.device, self.V
        rows = torch.tensor(spec, device=device)
        p = target_probs(cond[rows], _rows_of(self.base.rows.sampler, rows))  # (b, S, V)
        L = torch.tensor([windows[b] for b in spec], device=device)
        n = torch.tensor([self.n[b] for b in spec], device=device)
        # each image's own draws, as many as its window: accept tests and one race per column
        u = torch.full((len(spec), S), 2.0, device=device)  # 2: padding never accepts
        e = torch.full((len(spec), S, V), 0.5, device=device)
        for j, b in enumerate(spec):
            g, w = self.seqs[b].generator, windows[b]
            u[j, :w] = torch.rand(w, generator=g, device=g.device).to(device)
            e[j, :w] = torch.rand(w, V, generator=g, device=g.device).to(device)
        t = torch.arange(S, device=device)
        drafts = self.buf[rows[:, None], (n[:, None] + t).clamp(max=self.buf.shape[1] - 1)]  # (b, S)
        q = self.q[rows, :S]  # (b, S, V); column S-1 holds no draft
        p_d = p.gather(-1, drafts[..., None])[..., 0]
        q_d = q.gather(-1, drafts[..., None])[..., 0].clamp(min=1e-30)
        ratio = (p_d / q_d).clamp(max=1.0)
        gsd = torch.tensor([self.methods[b] == "gsd" for b in spec], device=device)
        if bool(gsd.any()):
            ratio = torch.where(gsd[:, None], self._group_ratio(spec, p, q, drafts, p_d), ratio)
        is_draft = t < (L - 1)[:, None]
        passed = (u < ratio) & is_draft  # every draft's own test
        k = passed.long().cumprod(1).sum(1)  # accepted drafts: up to the first rejection
        residual = (p - q).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
        from_residual, from_p = race(residual, e), race(p, e)
        # the token of a rejected column: its residual draw; past the last draft, a draw of p
        redrawn = torch.where(is_draft, from_residual, from_p)
        coupled = torch.tensor([self.methods[b] in COUPLED for b in spec], device=device)
        later = torch.where(coupled[:, None], torch.where(passed, drafts, redrawn), from_p)
        k_ = k[:, None]
        window_tokens = torch.where(t < k_, drafts, torch.where(t == k_, redrawn, later))
        in_window = t < L[:, None]
        at = (n[:, None] + t).clamp(max=self.buf.shape[1] - 1)
        self.buf[rows[:, None].expand_as(at)[in_window], at[in_window]] = window_tokens[in_window]
        # the next drafts' q: the targets of the columns after the committed ones
        src = (k_ + 1 + t).clamp(max=S - 1)
        self.q[rows, :S] = p.gather(1, src[..., None].expand(-1, -1, V))
        for b, kb in zip(spec, k.tolist(), strict=True):
            w = windows[b]
            self.n[b] += kb + 1
            self.drafts[b] = w - 1 - kb
            self.counts.drafted[b] += w - 1
            self.counts.accepted[b] += kb

    def _group_ratio(
        self, spec: list[int], p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, p_d: torch.Tensor
    ) -> torch.Tensor:
        """GSD's test: min(1, sum_G p / sum_G q) over the draft's group G, the `group` tokens either
        side of it in the target's ranking whose probability is within `p_threshold` of the draft's
        and whose squared input-embedding distance to it is within `distance` x the mean over pairs.
        (The official slice takes 7 below and 6 above; ours is symmetric, and a draft near the end
        of the ranking keeps the neighbours it has rather than being rejected.)"""
        device, V = p.device, p.shape[-1]
        cfg = [self.seqs[b].settings.speculative for b in spec]
        G = max(s.group for s in cfg)
        half = torch.tensor([s.group for s in cfg], device=device).view(-1, 1, 1)
        p_thr = torch.tensor([s.p_threshold for s in cfg], device=device).view(-1, 1, 1)
        d_thr = torch.tensor([s.distance * self.mean_sq for s in cfg], device=device).view(-1, 1, 1)
        order = p.argsort(-1, descending=True)  # (b, S, V)
        at = (order == drafts[..., None]).float().argmax(-1, keepdim=True)  # the draft's rank
        offsets = torch.arange(-G, G + 1, device=device)
        cand_at = at + offsets
        member = (cand_at >= 0) & (cand_at < V) & (offsets.abs() <= half)
        cand = order.gather(-1, cand_at.clamp(0, V - 1))  # (b, S, 2G + 1)
        p_c, q_c = p.gather(-1, cand), q.gather(-1, cand)
        e = self.embeddings
        dist = (e[cand] - e[drafts][..., None, :]).pow(2).sum(-1)
        member &= ((p_c - p_d[..., None]).abs() < p_thr) & (dist <= d_thr)
        member |= offsets == 0  # the draft itself
        group_p = (p_c * member).sum(-1)
        group_q = (q_c * member).sum(-1).clamp(min=1e-30)
        return (group_p / group_q).clamp(max=1.0)

    def _count_pass(self, active, S: int) -> None:
        self.forward_passes += 1
        for b in active:
            self.counts.passes[b] += 1
        self.counts.flops += window_flops(self.model, self.base.rows.count, S, max(self.n))


def _rows_of(sampler: SamplerRows, idx: torch.Tensor) -> SamplerRows:
    rows = idx.tolist()
    return SamplerRows(
        sampler.top_k[idx],
        sampler.top_p[idx],
        sampler.temperature[idx],
        [sampler.generators[i] for i in rows],
        tuple(sampler.top_k_values[i] for i in rows),
        tuple(sampler.top_p_values[i] for i in rows),
    )


def window_flops(model: GPT, rows: int, S: int, keys: int) -> float:
    """Matmul FLOPs of one pass of S tokens per row over about `keys` cached positions."""
    c = model.config
    kv_dim = c.n_kv_head * c.head_dim
    per_token = c.n_layer * (c.dim * (c.dim + 2 * kv_dim) + c.dim * c.dim + 3 * c.dim * c.ffn_hidden)
    attn = c.n_layer * 2 * c.dim * (keys + S)
    return 2.0 * rows * S * (per_token + c.dim * c.vocab_size + attn)
