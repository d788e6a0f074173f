"""The compressed scale store: per layer a ragged K/V slab that each (row, head) segment fills up to
the capacity its policy plans (models/kv/policies.py), read by kernels/scale_attention.py.

Layout, per layer (the kernel's): `k[layer]`, `v[layer]` (S_layer, D) and `pos[layer]` (S_layer,)
int32, each slot's absolute position (its scale and place on the map, for the rules that need
them); segment i = r * H + h (row r, head h: the conditional and null-class rows of a guided image
are rows, and segments, of their own) owns slots [offsets[i], offsets[i] + cap[i]) and holds
lengths[i] tokens, in position order. cap is the most the segment's plan ever holds, so the slab
is allocated once per batch and is exactly the budget's size: `nbytes` is the K and V slabs (the
int32 position tags, 1/(2D) of that in fp32, are metadata and not counted, as the papers count
K and V); `working_nbytes` adds the largest current scale's K/V held at once (one layer, one
group of rows: the model hands them over layer by layer).

A scale, per layer and group of rows: `write` hands over the scale's K/V; `attend` runs
`scale_attention` over [the rows' segments | the scale's own keys]; then, unless it is the last
scale (whose keys nobody reads again, so they are never stored), each row's policy picks what its
segments keep of [stored | current]: the best `counts[si]` candidates by the policy's
(tier, key), ties by candidate index (kernels/kv_select.py), ranked with `attention_mass` of the
observed queries where the policy needs it (on CPU summed in the scale's own attention pass, where
one policy holds the span's rows: the same bits without a second pass over the keys). The kept
candidates move to the front of the segment's own slots (kernels/kv_merge.compact_segments; a
segment only shrinks or grows within its slots, so nothing else moves).
Lengths are the plan's, known on the host: no step reads a device value to size anything.

**Merging** (a row's `merge`, the request's `kv_merge`; every policy but full, which evicts
nothing): a key the policy evicts (for heatkv, the keys of a scale a segment drops whole) is not
lost but folded into the kept key of its segment nearest to it (largest dot product with the kept keys, ties by the lower
column). A kept key then stands for c keys: it becomes their count-weighted mean (its norm the
mean of theirs, so l2-normalised keys stay unit), its value their count-weighted mean, and
`bias[layer]` (S_layer,) fp32 holds log c, which the kernel adds to its logit, so that one slot
weighs in the softmax as the c keys it replaced would if they were alike (exactly so when they
are equal; tests/kernels: a bias of log c equals c copies). Counts carry on: a merged key merged
again adds its whole count. The bias slab is counted in `nbytes` (4 bytes a slot beside K and V's
2 x D x itemsize: 1.6 % at D = 32 in fp32; none where the plan keeps every key). Merges are per
segment (each segment's candidates against its own kept keys, then sums onto the kept slots), so
an image still never depends on its batch.

Rows may carry different policies and budgets (each row is planned and ranked by its own; rows of
one policy are ranked together). The server still batches only requests of one policy and budget
(service/queue.py): on the CPU path, attention pads every segment of a group of rows to the
longest one, so rows of other policies in the batch would change an image's arithmetic in the
last bits, and a request's reported bytes would be its neighbours'.
"""

from __future__ import annotations

import functools

import torch

from kernels.kv_merge import compact_segments, merge_segments
from kernels.kv_select import select_columns
from kernels.scale_attention import attention_mass, scale_attention, scale_attention_with_mass_cpu
from models.kv.policies import Candidates, ScaleGeometry, plan_evicts, policy
from models.kv.profile import KVProfile
from models.kv.store import ScaleSpan


def slab_nbytes(
    geo: ScaleGeometry,
    profile: KVProfile,
    row_policies: list[tuple[str, float, bool]],
    head_dim: int,
    itemsize: int,
) -> int:
    """The bytes SlabScaleStore allocates for rows of (policy name, budget, merge), known from the
    plans alone: each (row, layer, head) segment at the most its plan ever holds, K and V, and a
    log count (fp32) per slot of every row where some row's plan folds keys (`full` keeps all)."""
    tokens, merging = 0, False
    for name, budget, merge in row_policies:
        counts = policy(name).plan(geo, profile, 1.0 if name == "full" else budget)  # (S - 1, depth, H)
        tokens += int(counts.max(0).values.sum())
        merging |= merge and plan_evicts(geo, counts)
    return tokens * (2 * head_dim * itemsize + (4 if merging else 0))


@functools.lru_cache(maxsize=512)
def _append_columns(held: tuple[int, ...], keeps: tuple[int, ...], n: int) -> torch.Tensor:
    """(H, max keeps) the columns of [stored | current] that the heads' segments, holding `held`
    tokens, keep when each takes the scale's n whole (keeps = held + n) or not at all (keeps =
    held): every stored column, then the scale's; -1 padded. Per head (every row of a plan repeats
    them) and read-only (shared): the same patterns come back every batch of a plan, and building
    them took ~10 small tensor ops a layer and scale. An entry is H x (stored + n) int64s (~170 KB
    at VAR-d30's largest), so 512 of them stay well under the slab they index."""
    old, new = torch.tensor(held), torch.tensor(keeps)
    max_old = max(held)
    j = torch.arange(max_old + n)[None, :]
    cols = torch.where(j < old[:, None], j, j - old[:, None] + max_old)
    return cols.masked_fill(j >= new[:, None], -1)[:, : max(keeps)].clone()  # not the wider storage


class SlabScaleStore:
    """See the module docstring. row_policies: (policy, budget, merge) per engine row."""

    def __init__(
        self,
        geo: ScaleGeometry,
        row_policies: list[tuple[object, float, bool]],
        profile: KVProfile,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ):
        self.geo, self.profile = geo, profile
        R, H, S = len(row_policies), geo.num_heads, len(geo.sizes)
        self.rows, self.device = R, device
        self._scale_at = {start: si for si, start in enumerate(geo.starts)}
        self._scale_of_pos = geo.scale_of_position().to(device)
        # rows of one (policy, budget) are planned once and ranked together
        groups: dict[tuple, list[int]] = {}
        for r, (p, b, merge) in enumerate(row_policies):
            groups.setdefault((p, b, merge and p.evicts), []).append(r)
        self.groups = []
        self._appending: dict[int, list[list[bool]]] = {}  # id(a group's counts) -> [si][layer]
        for (p, b, m), rows in groups.items():
            counts = p.plan(geo, profile, b)  # (S - 1, depth, H) held after each scale
            # a plan that keeps every key (a budget of 1) has nothing to merge: no log-count slab
            self.groups.append((p, b, m and plan_evicts(geo, counts), rows, counts))
            # whether its segments take scale si whole or not at all at each layer (`_appends`)
            before = torch.cat([torch.zeros_like(counts[:1]), counts[:-1]])
            n = torch.tensor(geo.sizes[: len(counts)])[:, None, None]
            whole = (counts == before + n).all(-1) | p.append_only  # (S - 1, depth)
            self._appending[id(counts)] = whole.tolist()
        # lengths[si][layer]: (R * H,) held before scale si (0 before the first); the host copy is
        # the plan itself, per group
        held = torch.zeros(S, geo.depth, R, H, dtype=torch.long)
        for _, _, _, rows, counts in self.groups:
            held[1:, :, rows] = counts[:, :, None, :]
        self._held = held.view(S, geo.depth, R * H)
        cap = self._held.max(0).values  # (depth, R * H)
        offsets = torch.cumsum(cap, 1) - cap
        self.cap, self._offsets = cap, offsets
        self.offsets = offsets.to(device)
        self.lengths = self._held.to(device)
        self.k = [torch.empty(int(n), head_dim, dtype=dtype, device=device) for n in cap.sum(1)]
        self.v = [torch.empty_like(k) for k in self.k]
        self.pos = [torch.full((int(n),), -1, dtype=torch.int32, device=device) for n in cap.sum(1)]
        # log counts of merged keys (0: a key for itself; rows that do not merge keep 0 throughout)
        merging = any(m for _, _, m, _, _ in self.groups)
        self.bias = (
            [torch.zeros(int(n), dtype=torch.float32, device=device) for n in cap.sum(1)] if merging else None
        )
        self._current: tuple[int, ScaleSpan, torch.Tensor, torch.Tensor] | None = None
        self._current_peak = 0

    # ---------------------------------------------------------------- the KVStore contract

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: ScaleSpan) -> None:
        """k, v: (b, H, n, D) of rows at.rows, the scale starting at at.start; held until `attend`."""
        self._current = (layer, at, k, v)
        self._current_peak = max(self._current_peak, k.nbytes + v.nbytes)

    def attend(self, layer: int, q: torch.Tensor, at: ScaleSpan, scale: float = 1.0) -> torch.Tensor:
        """q: (b, H, n, D) -> (b, H, n, D) over the rows' segments and the scale's own keys; then the
        scale's keys are kept as the rows' policies say (never for the last scale)."""
        cur_layer, cur_at, k, v = self._current
        assert cur_layer == layer and cur_at == at, "attend follows the write of the same layer and span"
        self._current = None
        si, H = self._scale_at[at.start], self.geo.num_heads
        segs = slice(at.rows.start * H, at.rows.stop * H)
        args = (
            q,
            k,
            v,
            self.k[layer],
            self.v[layer],
            self.offsets[layer, segs],
            self.lengths[si, layer, segs],
        )
        observed = self._observed_in_pass(layer, si, at, k.shape[2])
        fused = None
        if observed is not None:  # the ranking's mass in the attention's own pass (CPU)
            fused = scale_attention_with_mass_cpu(*args, observed, scale, bias_slab=self._bias(layer))
        mass = lse = None
        if fused is not None:
            out, *mass = fused
        elif any(self._observed(g, layer, si) is not None for g in self._holding(at)):
            # the forward's LSE, so that the mass pass (Triton on a GPU) does not run the forward
            # again for it; the CPU's mass computes its own softmax and ignores it
            out, lse = scale_attention(*args, scale, return_lse=True, bias_slab=self._bias(layer))
        else:
            out = scale_attention(*args, scale, bias_slab=self._bias(layer))
        if si < len(self.geo.sizes) - 1:
            for p, _, merge, rows, counts in self.groups:
                mine = [r for r in rows if at.rows.start <= r < at.rows.stop]
                if mine:
                    self._keep(p, merge, counts, layer, si, at, mine, q, k, v, scale, mass, lse)
        return out

    def _holding(self, at: ScaleSpan) -> list[tuple]:
        """The groups with rows in the span."""
        return [g for g in self.groups if any(at.rows.start <= r < at.rows.stop for r in g[3])]

    def _observed(self, group: tuple, layer: int, si: int) -> torch.Tensor | None:
        """The queries whose attention mass a group ranks scale si by at this layer (its policy's
        observed queries), or None where it ranks nothing there: the last scale, or it appends."""
        p, counts = group[0], group[4]
        if si == len(self.geo.sizes) - 1 or self._appends(counts, layer, si):
            return None
        return p.observed(self.geo, si)

    def _appends(self, counts: torch.Tensor, layer: int, si: int) -> bool:
        """Whether a group's segments take scale si whole or not at all at this layer, so that
        nothing is ranked: an append-only policy, or every segment keeping everything (from the
        plan, once per store)."""
        return self._appending[id(counts)][si][layer]

    def _observed_in_pass(self, layer: int, si: int, at: ScaleSpan, n: int) -> torch.Tensor | None:
        """(n,) bool, the queries whose attention mass the span's policy ranks by after this scale,
        where one group holds all the span's rows and ranks with mass here; else None."""
        holding = self._holding(at)
        if len(holding) != 1 or not set(range(at.rows.start, at.rows.stop)) <= set(holding[0][3]):
            return None
        obs = self._observed(holding[0], layer, si)
        if obs is None:
            return None
        return torch.zeros(n, dtype=torch.bool).index_fill_(0, obs.cpu(), True)

    def _bias(self, layer: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[layer]

    @property
    def nbytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v, strict=True))
        return kv + (sum(b.nbytes for b in self.bias) if self.bias is not None else 0)

    @property
    def working_nbytes(self) -> int:
        return self.nbytes + self._current_peak

    # ---------------------------------------------------------------- what the segments keep

    def segment_positions(self, layer: int, segment: int, si: int) -> torch.Tensor:
        """The positions segment `segment` holds after scale si (for tests and inspection)."""
        off, n = int(self._offsets[layer, segment]), int(self._held[si + 1, layer, segment])
        return self.pos[layer][off : off + n].long().cpu()

    def _keep(
        self, p, merge, counts, layer, si, at, rows: list[int], q, k, v, scale, mass=None, lse=None
    ) -> None:
        """Each segment of `rows` keeps what its policy says of [stored | scale si]. mass: the span's
        (mass_slab, mass_cur) from the attention pass (`_observed_in_pass`), or None; lse: the
        span's (b, H, n) from the attention pass, for the mass pass, or None."""
        H, n, dev = self.geo.num_heads, k.shape[2], self.device
        segs = (torch.tensor(rows)[:, None] * H + torch.arange(H)).flatten()  # (G,) on the host
        old_h = counts[si - 1, layer] if si > 0 else torch.zeros(H, dtype=torch.long)  # (H,)
        new_h = counts[si, layer]
        G = len(segs)
        old, new = old_h.repeat(len(rows)), new_h.repeat(len(rows))  # (G,) host
        off = self._offsets[layer, segs]
        if len(rows) < at.rows.stop - at.rows.start:  # some of the span's rows (rows are ascending)
            local = torch.tensor(rows, device=dev) - at.rows.start
            q, k, v = q[local], k[local], v[local]  # (len(rows), H, n, D)
            lse = None if lse is None else lse[local]
        # Append-only policies take a scale whole or not at all; any policy whose segments all keep
        # everything (a budget of 1, or a scale before the budget binds) appends too, without the
        # mass and ranking it would not use: `select_columns` keeps columns in order, so the layout
        # is the same either way.
        if self._appends(counts, layer, si):
            held, keeps = tuple(old_h.tolist()), tuple(new_h.tolist())
            assert all(b in (a, a + n) for a, b in zip(held, keeps, strict=True)), (p.name, held, keeps)
            if keeps == held and not merge:
                return
            cols = _append_columns(held, keeps, n).repeat(len(rows), 1)  # (G, max keeps)
            if merge and any(b == a for a, b in zip(held, keeps, strict=True)):
                # a segment that drops the scale (heatkv) folds its keys into what it holds
                self._write_merged(layer, cols, old, off, k.reshape(G, n, -1), v.reshape(G, n, -1), at.start)
                return
            # the compaction copies only the new keys (stored ones are in place), read from k and v
            compact_segments(self.k[layer], self.v[layer], self.pos[layer], off, old, cols, k, v, at.start)
            if merge:  # a key for itself (the slot may hold an earlier count)
                take = new == old + n
                slots = ((off + old)[take][:, None] + torch.arange(n)).flatten().to(dev)
                self.bias[layer][slots] = 0.0
            return
        c = self._candidates(p, layer, si, at, segs, old, off, q, k, v, scale, mass, lse)
        c.keep = new
        tier, key = p.rank(c, self.profile)
        cols = select_columns(tier.cpu(), key.cpu(), c.valid.cpu(), new)  # (G, max new), -1 padded
        if merge:
            self._write_merged(layer, cols, old, off, k.reshape(G, n, -1), v.reshape(G, n, -1), at.start)
        else:
            compact_segments(self.k[layer], self.v[layer], self.pos[layer], off, old, cols, k, v, at.start)

    def _candidates(
        self, p, layer, si, at, segs, old, off, q, k, v, scale, mass=None, lse=None
    ) -> Candidates:
        """[stored, padded to the longest | current] of each segment, with positions, scales, mass
        and, for a policy that `uses_values`, value norms. q, k, v: (rows, H, n, D), the segments'
        rows; lse: their (rows, H, n) from the attention pass, or None."""
        dev, n, G = self.device, k.shape[2], len(segs)
        max_old = int(old.max())
        cols = torch.arange(max_old)
        valid_old = cols[None, :] < old[:, None]  # (G, max_old)
        slot_old = torch.where(valid_old, off[:, None] + cols[None, :], 0).to(dev)
        valid = torch.cat([valid_old, torch.ones(G, n, dtype=torch.bool)], 1).to(dev)
        pos_old = self.pos[layer][slot_old].long() if max_old else slot_old
        pos = torch.cat([pos_old, (at.start + torch.arange(n, device=dev)).expand(G, n)], 1)
        pos = pos.masked_fill(~valid, -1)
        scale_ids = torch.where(valid, self._scale_of_pos[pos.clamp(min=0)], -1)
        heads = (segs % self.geo.num_heads).to(dev)
        obs = p.observed(self.geo, si)
        obs_pos, scores = None, None
        if obs is not None:
            obs = obs.to(dev)
            obs_pos = at.start + obs
            segs_d = segs.to(dev)
            mass_slab, mass_cur = (
                mass
                if mass is not None
                else attention_mass(
                    q[:, :, obs],
                    k,
                    self.k[layer],
                    self.offsets[layer, segs_d],
                    self.lengths[si, layer, segs_d],
                    scale,
                    lse=None if lse is None else lse[:, :, obs],
                    max_len=max_old,
                    bias_slab=self._bias(layer),
                )
            )
            mass_old = torch.where(valid_old.to(dev), mass_slab[slot_old], 0.0)
            scores = torch.cat([mass_old, mass_cur.reshape(G, n)], 1)
        value_norm = None
        if getattr(p, "uses_values", False):
            norm_old = torch.where(valid_old.to(dev), self.v[layer][slot_old].float().norm(dim=-1), 0.0)
            value_norm = torch.cat([norm_old, v.reshape(G, n, -1).float().norm(dim=-1)], 1)
        return Candidates(layer, si, heads, pos, scale_ids, valid, scores, obs_pos, value_norm=value_norm)

    def _write_merged(self, layer, cols, old, off, k_new, v_new, pos_start: int) -> None:
        """Keep `cols` (G, W) of each segment's candidates [stored | current] (-1 padded), every other
        candidate folded into its nearest kept key (kernels/kv_merge.py). old: (G,) stored lengths on
        the host; k_new, v_new: (G, n, D)."""
        merge_segments(
            self.k[layer],
            self.v[layer],
            self.bias[layer],
            self.pos[layer],
            off,
            old,
            cols,
            k_new,
            v_new,
            pos_start,
        )
