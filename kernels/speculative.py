"""A decode pass's sampling arithmetic: plain decoding's draw, and speculative decoding's target
distributions of a verification window and acceptance tests over it. References in PyTorch, our C
kernels on CPU in float32 (kernels/cpu/speculative.c), and the dispatch, in one file; the rules
are written out in the references' docstrings (models/sampling.py and
models/llamagen/speculative.py say what the engine feeds them).

- `sample(logits, top_k, temperature, top_p, uniform)` -> plain decoding's tokens: the candidates
  (`candidate_probs`: top-k, temperature, softmax, top-p) raced with each column's noise.

- `target_probs(logits, top_k, temperature, top_p)` -> the distribution plain decoding samples
  from (models/sampling.py's candidates: top-k, temperature, then top-p, renormalised).
- `commit(p, q, qrows, tokens, idx, n, windows, u, e, coupled, grouped, use_group)` -> the
  accepted lengths, having written each row's window of tokens (`verify_reference`: SJD's test
  and residual, SCD's coupled later drafts, GSD's grouped test) and its next drafts' q in place.
- `fill_drafts(tokens, q, idx, qrows, n, lo, hi, grid)`: fresh drafts, in place.
- `grouped_ratio(p, q, drafts, embeddings, half, p_threshold, d_threshold)` -> GSD's grouped test.

Rows of a pass are rows `idx` of the batch's token table (B, N) (each row's n committed tokens,
then its drafts) and rows `qrows` of its draft distributions (B_spec, W, V) (by offset after the
committed tokens), so the engine hands over its own tensors and nothing is gathered or scattered.

Off the CPU the references are what runs, once a pass, so they read nothing back from the device
(no value of a tensor decides a shape or a loop; given `plan` and `max_half` from the host):
the engine's accepted lengths are the one read a speculative pass needs.

Both draws of `verify` are exponential races (argmax w / E, E = -log1p(-uniform) ~ Exp(1)) over
the tokens with w > 0: a token the weights give no mass never wins, even where its uniform is 0.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import native

__all__ = [
    "candidate_probs",
    "commit",
    "commit_reference",
    "fill_drafts",
    "fill_drafts_reference",
    "grouped_ratio",
    "grouped_ratio_reference",
    "race",
    "sample",
    "sample_reference",
    "target_probs",
    "target_probs_reference",
    "verify_reference",
]


def _c(symbol: str, *argtypes, restype=ctypes.c_int):
    return native.function("speculative", symbol, *argtypes, restype=restype)


def _sample_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return _c("varserve_sample", *(ptr,) * 6, long, long, long)


def _target_probs_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return _c("varserve_target_probs", *(ptr,) * 5, long, long, long)


def _commit_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return _c("varserve_commit", *(ptr,) * 13, *(long,) * 5)


def _fill_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return _c("varserve_fill_drafts", *(ptr,) * 7, *(long,) * 5, restype=None)


def _grouped_kernel():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    return _c("varserve_grouped_ratio", *(ptr,) * 8, *(long,) * 4)


def _c_applies(floats: tuple[torch.Tensor, ...], longs: tuple[torch.Tensor, ...]) -> bool:
    """Our C kernels take contiguous float32 and int64 CPU tensors (in-place ones as they are)."""
    return all(x.is_cpu and x.dtype == torch.float32 and x.is_contiguous() for x in floats) and all(
        x.is_cpu and x.dtype == torch.long and x.is_contiguous() for x in longs
    )


def _row_settings(top_k: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor):
    """The per-row sampling settings as the C kernels read them: int64, float32, float32."""
    return (
        top_k.to(torch.long).contiguous(),
        temperature.to(torch.float32).contiguous(),
        top_p.to(torch.float32).contiguous(),
    )


# -- references -------------------------------------------------------------------------------


def candidate_probs(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    plan: tuple[int, bool, bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates plain decoding samples from (models/sampling.py), on (b, S, k_max) instead of
    the whole vocabulary: logits (b, S, V) float32; top_k (b,) long (<= 0: no limit); temperature,
    top_p (b,) float -> (probs, cand_idx), both (b, S, k_max).

    Per column the top_k largest logits, divided by the temperature, softmax; where 0 < top_p < 1
    the candidates after the smallest most likely prefix whose mass reaches top_p get probability 0
    (the most likely always stays); not renormalised. plan: (largest k, whether the candidates must
    be ordered, whether any row uses top-p) when the caller knows them on the host
    (SamplerRows.plan); else they are read from the tensors."""
    b = logits.shape[0]
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    use_p = ((top_p > 0) & (top_p < 1)).view(b, 1, 1)
    if plan is None:
        plan = (int(k.max()), bool(use_p.any()) or bool((k != k.max()).any()), bool(use_p.any()))
    k_max, ordered, any_p = plan
    # Only the k_max best candidates can survive top-k, and top-p works on what top-k left. Their
    # order only matters to top-p and to rows with a smaller k; a race does not care. Skipping the
    # sort saved 0.3 of 3.7 ms per step at batch 16 (k = 2000 of 16384).
    cand_logits, cand_idx = logits.topk(k_max, dim=-1, sorted=ordered)  # descending when ordered
    if ordered:
        rank = torch.arange(k_max, device=logits.device)
        cand_logits = cand_logits.masked_fill(rank >= k.view(b, 1, 1), -torch.inf)
    cand_logits = cand_logits / temperature.clamp(min=1e-5).view(b, 1, 1)
    probs = cand_logits.softmax(-1)
    if any_p:
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly better candidates
        drop = use_p & (mass_before >= top_p.view(b, 1, 1))
        drop[..., 0] = False
        probs = probs.masked_fill(drop, 0.0)
    return probs, cand_idx


def target_probs_reference(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    plan: tuple[int, bool, bool] | None = None,
) -> torch.Tensor:
    """logits (b, S, V) float32 -> (b, S, V) float32: `candidate_probs` renormalised (after top-p)
    and scattered over the vocabulary, zero elsewhere."""
    probs, cand_idx = candidate_probs(logits, top_k, temperature, top_p, plan)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, cand_idx, probs)


def sample_reference(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    plan: tuple[int, bool, bool] | None = None,
) -> torch.Tensor:
    """Plain decoding's draw: logits (b, S, V) float32, settings as candidate_probs', uniform
    (b, S, V) in [0, 1), each column's noise per vocabulary id -> tokens (b, S) long: the
    exponential race over the column's candidates (a dropped one never wins); top_k 1 is argmax."""
    probs, cand_idx = candidate_probs(logits, top_k, temperature, top_p, plan)
    choice = race(probs, uniform.gather(-1, cand_idx))[..., None]  # only the candidates' noise
    tokens = cand_idx.gather(-1, choice).squeeze(-1)
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    return torch.where((k == 1).view(-1, 1), logits.argmax(-1), tokens)


def race(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A draw from the categorical proportional to `weights` (..., V) (unnormalised, >= 0) with
    uniform noise (..., V) in [0, 1): argmax w / E, E = -log1p(-uniform) ~ Exp(1), over w > 0."""
    score = weights / -torch.log1p(-uniform)
    return score.masked_fill(weights <= 0, -1.0).argmax(-1)


def verify_reference(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    windows: torch.Tensor,
    u: torch.Tensor,
    e: torch.Tensor,
    coupled: torch.Tensor,
    grouped: torch.Tensor | None = None,
    use_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass's verification of b rows, S columns.

    p: (b, S, V) targets; q: (b, S, V) the drafts' distributions (column S-1 holds no draft);
    drafts: (b, S) the tokens at each column's offset; windows: (b,) each row's window L (columns
    >= L are padding); u: (b, S) uniforms of the acceptance tests; e: (b, S, V) the races' noise;
    coupled: (b,) bool, later rejected drafts redrawn from their residual (SCD, GSD); grouped:
    (b, S) a grouped test's ratio, taken instead of min(1, p/q) where use_group (b,) bool.

    A draft passes when u < min(1, p(d) / q(d)); the accepted length runs to the first rejection.
    -> accepted (b,), and window_tokens (b, S): the accepted drafts, the token drawn at the first
    rejection (from the residual norm(max(0, p - q)), or from p past the last draft), then the next
    pass's drafts: a draw of p, or (coupled) the draft itself where it passed its own test and
    its residual's draw where not."""
    S = p.shape[1]
    t = torch.arange(S, device=p.device)
    p_d = p.gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0].clamp(min=1e-30)
    ratio = (p_d / q_d).clamp(max=1.0)
    if grouped is not None:
        ratio = torch.where(use_group[:, None], grouped, ratio)
    is_draft = t < (windows - 1)[:, None]
    passed = (u < ratio) & is_draft  # every draft's own test
    accepted = passed.long().cumprod(1).sum(1)
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    from_residual, from_p = race(residual, e), race(p, e)
    redrawn = torch.where(is_draft, from_residual, from_p)
    later = torch.where(coupled[:, None], torch.where(passed, drafts, redrawn), from_p)
    k = accepted[:, None]
    return accepted, torch.where(t < k, drafts, torch.where(t == k, redrawn, later))


def commit_reference(
    p: torch.Tensor,
    q: torch.Tensor,
    qrows: torch.Tensor,
    tokens: torch.Tensor,
    idx: torch.Tensor,
    n: torch.Tensor,
    windows: torch.Tensor,
    u: torch.Tensor,
    e: torch.Tensor,
    coupled: torch.Tensor,
    grouped: torch.Tensor | None = None,
    use_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pass's verification of b rows committed in place. p, e: (b, S, V); q: (B_spec, W, V),
    row j's drafts' distributions at qrows[j]; tokens: (B, N), row j's at idx[j] with n[j] (b,)
    committed; windows, u, coupled, grouped, use_group: as verify_reference.

    Writes the window's tokens (verify_reference) at n[j] + t for t < windows[j], and q rows t < S
    to p's column min(k + 1 + t, S - 1) (the targets of the columns after the committed ones:
    the next drafts' q) -> accepted (b,) long."""
    S, V, N = p.shape[1], p.shape[2], tokens.shape[1]
    t = torch.arange(S, device=p.device)
    at = (n[:, None] + t).clamp(max=N - 1)
    drafts = tokens[idx[:, None], at]  # (b, S)
    k, window_tokens = verify_reference(p, q[qrows, :S], drafts, windows, u, e, coupled, grouped, use_group)
    # every column writes, those past a row's window its last column's token at its position: the
    # duplicates carry one value, and no boolean mask waits for the device
    col = torch.minimum(t, windows[:, None] - 1)  # (b, S)
    tokens[idx[:, None], n[:, None] + col] = window_tokens.gather(1, col)
    src = (k[:, None] + 1 + t).clamp(max=S - 1)
    q[qrows, :S] = p.gather(1, src[..., None].expand(-1, -1, V))
    return k


def fill_drafts_reference(
    tokens: torch.Tensor,
    q: torch.Tensor,
    idx: torch.Tensor,
    qrows: torch.Tensor,
    n: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    grid: int,
    width: int | None = None,
) -> None:
    """Tops b rows up from `lo` to `hi` drafts (b,), in place: tokens (B, N), row j's at idx[j] with
    n[j] committed; q (B_spec, W, V), row j's at qrows[j]. A fresh draft copies the token one grid
    row up (on the first grid row: its left neighbour), as drafting them one by one in order
    gives, so its q is one-hot. width: at least hi's largest, when the caller knows it on the
    host (else every row of q, W: nothing is read back either way)."""
    V, N = q.shape[-1], tokens.shape[1]
    T = q.shape[1] if width is None else width
    b, dev = len(idx), n.device
    t = torch.arange(T, device=dev)
    fill = (t >= lo[:, None]) & (t < hi[:, None])  # (b, T)
    pos = (n[:, None] + t).clamp(max=N - 1)  # a row past its own drafts may point beyond the image
    src = torch.where(pos >= grid, pos - grid, pos - 1)
    # A fresh draft may copy another (on the first grid row each copies its left neighbour; a
    # window wider than a row copies drafts above it), and sources come before their drafts: each
    # row's positions point at what they copy (the others at themselves, the columns not filled
    # into a spare column N), and pointer jumping takes every draft to the token its chain ends at,
    # in log2(T) gathers where sweeping until nothing changed read the device back each sweep.
    source = torch.arange(N + 1, device=dev).repeat(b, 1)
    source.scatter_(1, torch.where(fill, pos, N), torch.where(fill, src, N))
    for _ in range(T.bit_length()):
        source = source.gather(1, source)
    drafted = tokens[idx].gather(1, source[:, :N])  # (b, N) the rows with their drafts
    tokens[idx] = drafted
    one_hot = torch.zeros(b, T, V, dtype=q.dtype, device=dev).scatter_(
        2, drafted.gather(1, pos)[..., None], 1.0
    )
    q[qrows, :T] = torch.where(fill[..., None], one_hot, q[qrows, :T])


def grouped_ratio_reference(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    embeddings: torch.Tensor,
    half: torch.Tensor,
    p_threshold: torch.Tensor,
    d_threshold: torch.Tensor,
    max_half: int | None = None,
) -> torch.Tensor:
    """GSD's grouped test. p, q: (b, S, V); drafts: (b, S); embeddings: (V, dim); half: (b,) long;
    p_threshold, d_threshold: (b,) -> (b, S) min(1, sum_G p / sum_G q). max_half: half's largest,
    when the caller knows it on the host (else it is read from the device).

    The group of a draft d: the draft, and the tokens at most half[j] places either side of it in
    the ranking of p (descending, ties by index, so the tokens without mass follow in index order)
    with |p_c - p_d| < p_threshold and squared embedding distance to d <= d_threshold."""
    device, V = p.device, p.shape[-1]
    G = int(half.max()) if max_half is None else max_half
    p_d = p.gather(-1, drafts[..., None])
    order = p.sort(dim=-1, descending=True, stable=True).indices  # (b, S, V)
    at = (order == drafts[..., None]).float().argmax(-1, keepdim=True)  # the draft's rank
    offsets = torch.arange(-G, G + 1, device=device)
    cand_at = at + offsets
    member = (cand_at >= 0) & (cand_at < V) & (offsets.abs() <= half.view(-1, 1, 1))
    cand = order.gather(-1, cand_at.clamp(0, V - 1))  # (b, S, 2G + 1)
    p_c, q_c = p.gather(-1, cand), q.gather(-1, cand)
    dist = (embeddings[cand] - embeddings[drafts][..., None, :]).pow(2).sum(-1)
    member &= ((p_c - p_d).abs() < p_threshold.view(-1, 1, 1)) & (dist <= d_threshold.view(-1, 1, 1))
    member |= offsets == 0  # the draft itself
    group_p = (p_c * member).sum(-1)
    group_q = (q_c * member).sum(-1).clamp(min=1e-30)
    return (group_p / group_q).clamp(max=1.0)


# -- dispatch ---------------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    plan: tuple[int, bool, bool] | None = None,
) -> torch.Tensor:
    """As sample_reference: our C kernel for float32 CPU tensors (one call where the reference
    is a dozen operators: 118 against 39 us a step at batch 1 on this CPU, 165 against 87 at 8,
    the uniforms' draws included), else the reference."""
    kernel = _sample_kernel()
    logits, uniform = logits.contiguous(), uniform.contiguous()
    top_k, temperature, top_p = _row_settings(top_k, temperature, top_p)
    if kernel is None or not _c_applies((logits, temperature, top_p, uniform), (top_k,)):
        return sample_reference(logits, top_k, temperature, top_p, uniform, plan)
    b, S, V = logits.shape
    tokens = torch.empty(b, S, dtype=torch.long)
    ptrs = (t.data_ptr() for t in (logits, top_k, temperature, top_p, uniform, tokens))
    if kernel(*ptrs, b, S, V) != 0:
        raise MemoryError("sample: no memory for the candidates")
    return tokens


def target_probs(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    plan: tuple[int, bool, bool] | None = None,
) -> torch.Tensor:
    """As target_probs_reference: our C kernel for float32 CPU tensors, else the reference.
    plan: as candidate_probs', so the reference never reads it back from the device."""
    kernel = _target_probs_kernel()
    logits = logits.contiguous()
    top_k, temperature, top_p = _row_settings(top_k, temperature, top_p)
    if kernel is None or not _c_applies((logits, temperature, top_p), (top_k,)):
        return target_probs_reference(logits, top_k, temperature, top_p, plan)
    b, S, V = logits.shape
    out = torch.empty_like(logits)
    ptrs = (t.data_ptr() for t in (logits, top_k, temperature, top_p, out))
    if kernel(*ptrs, b, S, V) != 0:
        raise MemoryError("target_probs: no memory for the candidates")
    return out


def commit(
    p: torch.Tensor,
    q: torch.Tensor,
    qrows: torch.Tensor,
    tokens: torch.Tensor,
    idx: torch.Tensor,
    n: torch.Tensor,
    windows: torch.Tensor,
    u: torch.Tensor,
    e: torch.Tensor,
    coupled: torch.Tensor,
    grouped: torch.Tensor | None = None,
    use_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """As commit_reference: our C kernel for float32 CPU tensors, else the reference."""
    kernel = _commit_kernel()
    p, u, e = p.contiguous(), u.contiguous(), e.contiguous()
    qrows, idx, n, windows = (x.to(torch.long).contiguous() for x in (qrows, idx, n, windows))
    floats = (p, q, u, e) + (() if grouped is None else (grouped.contiguous(),))
    if kernel is None or not _c_applies(floats, (qrows, tokens, idx, n, windows)):
        return commit_reference(p, q, qrows, tokens, idx, n, windows, u, e, coupled, grouped, use_group)
    b, S, V = p.shape
    coupled = coupled.to(torch.uint8).contiguous()
    optional = (None, None)
    if grouped is not None:
        grouped, use_group = floats[-1], use_group.to(torch.uint8).contiguous()
        optional = (grouped.data_ptr(), use_group.data_ptr())
    accepted = torch.empty(b, dtype=torch.long)
    in_order = (p, q, qrows, tokens, idx, n, windows, u, e, coupled)
    status = kernel(
        *(x.data_ptr() for x in in_order),
        *optional,
        accepted.data_ptr(),
        b,
        S,
        V,
        q.shape[1],
        tokens.shape[1],
    )
    if status != 0:
        raise MemoryError("commit: no memory for the residuals")
    return accepted


def fill_drafts(
    tokens: torch.Tensor,
    q: torch.Tensor,
    idx: torch.Tensor,
    qrows: torch.Tensor,
    n: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    grid: int,
    width: int | None = None,
) -> None:
    """As fill_drafts_reference: our C kernel for float32 CPU tensors, else the reference."""
    kernel = _fill_kernel()
    idx, qrows, n, lo, hi = (x.to(torch.long).contiguous() for x in (idx, qrows, n, lo, hi))
    if kernel is None or not _c_applies((q,), (tokens, idx, qrows, n, lo, hi)):
        return fill_drafts_reference(tokens, q, idx, qrows, n, lo, hi, grid, width)
    V, W, N = q.shape[-1], q.shape[1], tokens.shape[1]
    ptrs = (x.data_ptr() for x in (tokens, q, idx, qrows, n, lo, hi))
    kernel(*ptrs, len(idx), V, W, N, grid)


def grouped_ratio(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    embeddings: torch.Tensor,
    half: torch.Tensor,
    p_threshold: torch.Tensor,
    d_threshold: torch.Tensor,
    max_half: int | None = None,
) -> torch.Tensor:
    """As grouped_ratio_reference: our C kernel for float32 CPU tensors, else the reference."""
    kernel = _grouped_kernel()
    p, q, embeddings = p.contiguous(), q.contiguous(), embeddings.contiguous()
    p_threshold = p_threshold.to(torch.float32).contiguous()
    d_threshold = d_threshold.to(torch.float32).contiguous()
    drafts, half = drafts.to(torch.long).contiguous(), half.to(torch.long).contiguous()
    if kernel is None or not _c_applies((p, q, embeddings, p_threshold, d_threshold), (drafts, half)):
        return grouped_ratio_reference(p, q, drafts, embeddings, half, p_threshold, d_threshold, max_half)
    b, S, V = p.shape
    out = torch.empty(b, S)
    ptrs = (x.data_ptr() for x in (p, q, drafts, embeddings, half, p_threshold, d_threshold, out))
    if kernel(*ptrs, b, S, V, embeddings.shape[1]) != 0:
        raise MemoryError("grouped_ratio: no memory for the ranking")
    return out
