"""kv_merge's C kernels (kernels/cpu/kv_merge.c) against their PyTorch references: ragged segments,
empty and full ones, kept counts across the kernel's 16-key panels, ties, and bad columns; and the
compaction without a merge."""

import pytest
import torch
import torch.nn.functional as F

from kernels.kv_merge import (
    _c_kernel,
    compact_segments_cpu,
    compact_segments_torch,
    merge_segments,
    merge_segments_cpu,
    merge_segments_torch,
)

pytestmark = pytest.mark.skipif(_c_kernel() is None, reason="no C compiler")


def random_case(stored, n, keeps, D, seed=0):
    """Segments with `stored` tokens each (their slots first in the slab, 3 to spare), `n`
    current tokens, and `keeps[g]` kept columns drawn at random among each segment's candidates."""
    g = torch.Generator().manual_seed(seed)
    G = len(stored)
    max_stored = max(stored)
    cap = [max(s, k) + 3 for s, k in zip(stored, keeps, strict=True)]  # 3 slots to spare each
    offsets = torch.tensor([0] + cap[:-1]).cumsum(0)
    S = sum(cap)
    slab = {
        "k": F.normalize(torch.randn(S, D, generator=g), dim=-1),
        "v": torch.randn(S, D, generator=g),
        "bias": torch.rand(S, generator=g) * 2,  # earlier merges: counts 1 .. e^2
        "pos": torch.randint(0, 500, (S,), generator=g, dtype=torch.int32),
    }
    k_new = F.normalize(torch.randn(G, n, D, generator=g), dim=-1)
    v_new = torch.randn(G, n, D, generator=g)
    width = max(keeps)
    cols = torch.full((G, width), -1, dtype=torch.long)
    for i, (s, keep) in enumerate(zip(stored, keeps, strict=True)):
        candidates = torch.cat([torch.arange(s), max_stored + torch.arange(n)])
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:keep]].sort().values
        cols[i, :keep] = chosen
    return slab, offsets, torch.tensor(stored), cols, k_new, v_new


def run(fn, case, pos_start=100):
    slab, offsets, stored, cols, k_new, v_new = case
    out = {name: t.clone() for name, t in slab.items()}
    fn(out["k"], out["v"], out["bias"], out["pos"], offsets, stored, cols, k_new, v_new, pos_start)
    return out


def assert_same_merge(got, want):
    torch.testing.assert_close(got["k"], want["k"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got["v"], want["v"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got["bias"], want["bias"], atol=2e-6, rtol=1e-5)
    assert torch.equal(got["pos"], want["pos"])


@pytest.mark.parametrize(
    "stored, n, keeps, D",
    [
        ([5, 0, 3], 4, [4, 2, 1], 16),  # a segment with nothing stored yet
        ([12, 12], 9, [21, 10], 32),  # one keeps every candidate
        ([30, 7, 19, 0], 25, [17, 16, 33, 1], 32),  # kept counts across the 16-key panels
        ([40, 40], 169, [20, 100], 64),
        ([3], 1, [1], 24),  # D no multiple of 8
    ],
)
def test_c_kernel_matches_the_reference(stored, n, keeps, D):
    case = random_case(stored, n, keeps, D, seed=sum(keeps))
    assert_same_merge(run(merge_segments_cpu, case), run(merge_segments_torch, case))


def test_untouched_slots_stay_and_every_count_is_accounted_for():
    case = random_case([10, 6], 8, [5, 3], 16, seed=3)
    slab, offsets, stored, cols, *_ = case
    got = run(merge_segments, case)
    for g, (o, s, keep) in enumerate(zip(offsets.tolist(), stored.tolist(), (5, 3), strict=True)):
        rest = slice(o + keep, o + max(s, keep) + 3)  # past the kept slots: unchanged
        assert torch.equal(got["k"][rest], slab["k"][rest])
        # the kept counts add up to the stored counts plus one per current token
        want = slab["bias"][o : o + s].exp().sum() + 8
        torch.testing.assert_close(got["bias"][o : o + keep].exp().sum(), want)
        kept = cols[g, :keep]
        want_pos = torch.where(kept < 10, slab["pos"][o + kept.clamp(max=s - 1)], 100 + kept - 10).int()
        assert torch.equal(got["pos"][o : o + keep], want_pos)
        torch.testing.assert_close(got["k"][o : o + keep].norm(dim=-1), torch.ones(keep))


def test_a_tie_goes_to_the_first_kept_key():
    # two kept keys equal to each other and to the evicted one: the first takes it
    case = random_case([0], 3, [2], 16)
    slab, offsets, stored, cols, k_new, v_new = case
    k_new[0, 2] = k_new[0, 1] = k_new[0, 0]
    cols[0] = torch.tensor([1, 2])  # keep tokens 1 and 2, fold token 0
    for fn in (merge_segments_cpu, merge_segments_torch):
        got = run(fn, case)
        torch.testing.assert_close(got["bias"][:2].exp(), torch.tensor([2.0, 1.0]))


def test_a_segment_merges_the_same_alone_or_beside_others():
    case = random_case([20, 9, 31], 16, [12, 5, 18], 32, seed=7)
    together = run(merge_segments_cpu, case)
    slab, offsets, stored, cols, k_new, v_new = case
    max_stored = int(stored.max())
    for g in range(3):
        alone = {name: t.clone() for name, t in slab.items()}
        # alone, its current tokens' columns start after its own stored ones
        mine = cols[g : g + 1, : int((cols[g] >= 0).sum())]
        mine = torch.where(mine >= max_stored, mine - max_stored + stored[g], mine)
        merge_segments_cpu(
            alone["k"], alone["v"], alone["bias"], alone["pos"], offsets[g : g + 1], stored[g : g + 1],
            mine, k_new[g : g + 1], v_new[g : g + 1], 100,
        )  # fmt: skip
        mine = slice(int(offsets[g]), int(offsets[g]) + mine.shape[1])
        for name in slab:
            assert torch.equal(alone[name][mine], together[name][mine]), (g, name)


def test_a_tie_across_panels_goes_to_the_first_kept_key():
    # 20 kept keys, two of the kernel's 16-key panels: tokens 4, 17 and 20 (kept columns 3, 16 and
    # 19) equal the evicted token 0; the lowest kept column takes it, whatever lane or panel the
    # others sit in (unit keys: no other kept key reaches a dot product of 1)
    case = random_case([0], 21, [20], 16, seed=11)
    slab, offsets, stored, cols, k_new, v_new = case
    cols[0] = torch.arange(1, 21)
    k_new[0, 4] = k_new[0, 17] = k_new[0, 20] = k_new[0, 0]
    for fn in (merge_segments_cpu, merge_segments_torch):
        counts = run(fn, case)["bias"][:20].exp()
        torch.testing.assert_close(counts, torch.where(torch.arange(20) == 3, 2.0, 1.0))


@pytest.mark.parametrize("stored, n, keeps", [([4, 2], 0, [3, 1]), ([0, 0], 3, [3, 3])])
def test_no_current_tokens_or_nothing_stored(stored, n, keeps):
    case = random_case(stored, n, keeps, 16, seed=2)
    assert_same_merge(run(merge_segments_cpu, case), run(merge_segments_torch, case))


BAD_COLUMNS = {
    "past the candidates": torch.tensor([0, 8]),  # 5 stored + 3 current: columns 0..7
    "descending": torch.tensor([6, 5]),
    "a column after the -1": torch.tensor([-1, 6]),
}


@pytest.mark.parametrize("bad", ["a padding column", *BAD_COLUMNS])
def test_a_kept_column_that_is_no_candidate_is_an_error_and_nothing_is_written(bad):
    slab, offsets, stored, cols, k_new, v_new = random_case([2, 5], 3, [2, 2], 16)
    if bad == "a padding column":
        cols[0] = torch.tensor([1, 3])  # segment 0 holds 2 of the 5 stored columns: 3 is padding
    else:
        cols[1] = BAD_COLUMNS[bad]
    before = {name: t.clone() for name, t in slab.items()}
    with pytest.raises(ValueError, match="kept column that is no candidate"):
        merge_segments_cpu(
            slab["k"], slab["v"], slab["bias"], slab["pos"], offsets, stored, cols, k_new, v_new, 0
        )
    for name in slab:  # the valid segment was not merged either
        assert torch.equal(slab[name], before[name]), name


def compact(fn, case, dtype=torch.float32, pos_start=100):
    slab, offsets, stored, cols, k_new, v_new = case
    out = {name: slab[name].clone() for name in ("k", "v", "pos")}
    out["k"], out["v"] = out["k"].to(dtype), out["v"].to(dtype)
    fn(out["k"], out["v"], out["pos"], offsets, stored, cols, k_new.to(dtype), v_new.to(dtype), pos_start)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "stored, n, keeps, D",
    [
        ([5, 0, 3], 4, [4, 2, 1], 16),
        ([30, 7, 19, 0], 25, [17, 16, 33, 1], 32),
        ([40, 40], 169, [20, 100], 24),
    ],
)
def test_compaction_in_c_equals_the_reference_exactly(stored, n, keeps, D, dtype):
    case = random_case(stored, n, keeps, D, seed=sum(keeps) + 1)
    got, want = compact(compact_segments_cpu, case, dtype), compact(compact_segments_torch, case, dtype)
    for name in got:
        assert torch.equal(got[name], want[name]), name


def test_compaction_moves_the_kept_candidates_to_the_front_in_column_order():
    case = random_case([6, 2], 3, [4, 3], 16, seed=5)
    slab, offsets, stored, cols, k_new, v_new = case
    cols[0] = torch.tensor([1, 4, 6, 8])  # stored 1 and 4, current 0 and 2 (columns from 6)
    cols[1] = torch.tensor([0, 7, -1, -1])  # stored 0, current 1
    got = compact(compact_segments_cpu, case)
    o0, o1 = offsets.tolist()
    assert torch.equal(
        got["k"][o0 : o0 + 4], torch.stack([slab["k"][o0 + 1], slab["k"][o0 + 4], k_new[0, 0], k_new[0, 2]])
    )
    assert got["pos"][o0 : o0 + 4].tolist() == [*slab["pos"][[o0 + 1, o0 + 4]].tolist(), 100, 102]
    assert torch.equal(got["v"][o1 : o1 + 2], torch.stack([slab["v"][o1], v_new[1, 1]]))
    assert got["pos"][o1 : o1 + 2].tolist() == [int(slab["pos"][o1]), 101]
    rest = slice(o1 + 2, len(slab["k"]))  # past segment 1's kept slots: untouched
    assert torch.equal(got["k"][rest], slab["k"][rest])


def test_a_bad_column_in_compaction_is_an_error_and_nothing_is_written():
    slab, offsets, stored, cols, k_new, v_new = random_case([2, 5], 3, [2, 2], 16)
    cols[1] = torch.tensor([6, 5])  # descending
    before = {name: slab[name].clone() for name in ("k", "v", "pos")}
    with pytest.raises(ValueError, match="kept column that is no candidate"):
        compact_segments_cpu(slab["k"], slab["v"], slab["pos"], offsets, stored, cols, k_new, v_new, 0)
    for name, t in before.items():
        assert torch.equal(slab[name], t), name


def test_compaction_reads_the_models_strided_rows_and_heads_in_place():
    # k, v as the model hands them over: (rows, H, n, D) views of a (rows, n, 3, H, D) projection
    rows, H, n, D = 3, 2, 5, 16
    case = random_case([4, 0, 6, 2, 3, 1], n, [5, 3, 7, 2, 8, 1], D, seed=13)
    slab, offsets, stored, cols, k_new, v_new = case
    qkv = torch.randn(rows, n, 3, H, D)
    k_view, v_view = qkv.permute(2, 0, 3, 1, 4)[1], qkv.permute(2, 0, 3, 1, 4)[2]
    assert not k_view.is_contiguous()
    strided = (slab, offsets, stored, cols, k_view, v_view)
    dense = (slab, offsets, stored, cols, k_view.reshape(rows * H, n, D), v_view.reshape(rows * H, n, D))
    got, want = compact(compact_segments_cpu, strided), compact(compact_segments_torch, dense)
    for name in got:
        assert torch.equal(got[name], want[name]), name
