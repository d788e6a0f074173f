"""The compression policies without a model: their static plans (budgets held, counts feasible) and
their selection rules on hand-made candidates and mass (ties broken by index)."""

import pytest
import torch

from kernels.kv_select import select_columns
from models.kv.policies import (
    HACK,
    KV_POLICIES,
    POLICIES,
    Candidates,
    HeatKV,
    ScaleGeometry,
    ScaleKV,
    SnapKV,
    ValueKV,
    Window,
    budget_tokens,
    grid_centres,
    policy,
    strided_queries,
)
from models.kv.profile import KVProfile

GEO = ScaleGeometry((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), depth=4, num_heads=4)
S = len(GEO.patch_nums)


def mixed_profile(geo: ScaleGeometry = GEO) -> KVProfile:
    """Half the heads structural, layer 0 (and layer 2 at some scales) a drafter, scores that vary."""
    L, H = geo.depth, geo.num_heads
    return KVProfile(
        geo.patch_nums,
        L,
        H,
        tuple(tuple("structural" if (l + h) % 2 else "contextual" for h in range(H)) for l in range(L)),
        tuple(
            tuple("drafter" if l == 0 or (l == 2 and s % 3 == 0) else "refiner" for l in range(L))
            for s in range(S)
        ),
        tuple(
            tuple(tuple(float((7 * l + 3 * h + s) % 11) for s in range(S)) for h in range(H))
            for l in range(L)
        ),
    )


PROFILES = {"default": KVProfile.default(GEO.patch_nums, GEO.depth, GEO.num_heads), "mixed": mixed_profile()}


def test_budget_tokens_are_the_paper_fraction_of_the_424_token_prefix():
    assert GEO.stored_len == 424
    assert [budget_tokens(GEO, b) for b in (1.0, 0.5, 0.25, 0.1, 0.05)] == [424, 212, 106, 42, 21]


@pytest.mark.parametrize("profile", PROFILES, ids=str)
@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
@pytest.mark.parametrize("name", KV_POLICIES)
def test_plans_hold_the_budget_and_never_keep_more_than_exists(name, budget, profile):
    counts = policy(name).plan(GEO, PROFILES[profile], budget)  # (S - 1, depth, H)
    assert counts.shape == (S - 1, GEO.depth, GEO.num_heads)
    assert counts.dtype == torch.long and bool((counts >= 0).all())
    held = torch.zeros(GEO.depth, GEO.num_heads, dtype=torch.long)
    for si in range(S - 1):
        assert bool((counts[si] <= held + GEO.sizes[si]).all()), (si, "keeps more than it has")
        held = counts[si]
    slab = counts.max(0).values.sum()  # the slab is sized by each segment's most
    allowed = (
        424 * GEO.depth * GEO.num_heads
        if name == "full"
        else budget_tokens(GEO, budget) * GEO.depth * GEO.num_heads
    )
    assert slab <= allowed
    if name != "heatkv":  # whole segments: heatkv lands below the budget by up to one segment
        assert slab >= allowed - GEO.depth * GEO.num_heads  # rounding only
    else:
        assert slab > allowed - GEO.sizes[-2]


def candidates(si: int, stored: list[list[int]], mass=None, heads=None, layer=0, obs=None) -> Candidates:
    """Segments holding the given positions, then the whole scale si, in the store's layout."""
    n, start = GEO.sizes[si], GEO.starts[si]
    width = max(len(p) for p in stored)
    pos = torch.tensor([p + [-1] * (width - len(p)) + list(range(start, start + n)) for p in stored])
    valid = pos >= 0
    of_pos = GEO.scale_of_position()
    scale = torch.where(valid, of_pos[pos.clamp(min=0)], -1)
    heads = torch.zeros(len(stored), dtype=torch.long) if heads is None else torch.tensor(heads)
    mass = None if mass is None else torch.as_tensor(mass, dtype=torch.float32)
    return Candidates(layer, si, heads, pos, scale, valid, mass, obs)


def kept_positions(p, c: Candidates, keep: int, profile=PROFILES["default"]) -> list[list[int]]:
    tier, key = p.rank(c, profile)
    cols = select_columns(tier, key, c.valid, torch.full((c.pos.shape[0],), keep))
    return [[int(c.pos[g, j]) for j in row if j >= 0] for g, row in enumerate(cols)]


@pytest.mark.parametrize("name", [n for n, p in POLICIES.items() if p.evicts and not p.append_only])
def test_rankings_stay_on_the_candidates_device(name):
    """On a GPU the store's candidates live on the device: a ranking that builds a table on the
    host and mixes it in fails there (HACK's head classes did), never on this CPU. The meta device
    stands in for it: anything made on the host and combined with the candidates raises."""
    c = candidates(3, [[0, 1, 2, 3, 4], [0, 1]], mass=torch.rand(2, 5 + GEO.sizes[3]), heads=[0, 1])
    obs = None if name != "scalekv" else policy(name).observed(GEO, 3) + GEO.starts[3]
    on_meta = {f: getattr(c, f).to("meta") for f in ("heads", "pos", "scale", "valid", "mass")}
    meta = Candidates(c.layer, c.si, obs_pos=None if obs is None else obs.to("meta"), **on_meta)
    meta.value_norm = torch.ones(c.pos.shape, device="meta")
    meta.keep = torch.full((2,), 4, device="meta")
    tier, key = policy(name).rank(meta, PROFILES["mixed"])
    assert tier.device.type == key.device.type == "meta" and tier.shape == key.shape == c.pos.shape


def test_valuekv_keeps_the_most_mass_times_squared_value_norm():
    c = candidates(
        2, [[0, 1, 2, 3, 4]], mass=[[4.0, 2.0, 0.1, 2.0, 0.0, 1.0, 1.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    )
    # the sink-like position 0 draws the most mass with a small value; pos 3's value is twice pos 1's
    c.value_norm = torch.tensor([[0.25, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    # scores: 0.25, 2, 0.1, 8, 0, then 1, 1, 3, 1, ...: pos 3, 7, 1, then the 1.0s by index: 5, 6
    assert kept_positions(ValueKV(), c, 5) == [[1, 3, 5, 6, 7]]
    assert kept_positions(SnapKV(), c, 5) == [[0, 1, 3, 5, 7]]  # by mass alone the sink stays


def test_the_store_hands_valuekv_the_norms_of_its_candidates_values():
    from models.kv.compressed import SlabScaleStore
    from models.kv.store import ScaleSpan

    torch.manual_seed(0)
    geo = ScaleGeometry((1, 2, 3), depth=1, num_heads=2)
    store = SlabScaleStore(
        geo, [(ValueKV(), 0.5, False)], KVProfile.default(geo.patch_nums, 1, 2), 8, torch.float32, "cpu"
    )
    seen = []
    rank = ValueKV.rank

    def spy(self, c, profile):
        seen.append(c.value_norm.clone())
        return rank(self, c, profile)

    ValueKV.rank = spy
    try:
        values = []
        for si, start in enumerate(geo.starts):
            n = geo.sizes[si]
            q, k, v = torch.randn(3, 1, 2, n, 8).unbind(0)
            values.append(v)
            at = ScaleSpan(slice(0, 1), start, start + n)
            store.write(0, k, v, at)
            store.attend(0, q, at)
    finally:
        ValueKV.rank = rank
    (norms,) = seen  # budget 0.5 of 5 stored tokens: 2 per segment, ranked only after scale 1
    stored = torch.cat([values[0], values[1]], 2)[0]  # (H, 5, D): what scale 1's candidates are
    torch.testing.assert_close(norms, stored.norm(dim=-1))


def test_window_keeps_the_sink_scales_then_the_most_recent_positions():
    # after scale 4 (positions 30..54), a segment that held 0..29
    c = candidates(4, [list(range(30))])
    assert kept_positions(Window(), c, 12) == [[0, 1, 2, 3, 4, *range(48, 55)]]
    assert kept_positions(Window(), c, 3) == [[0, 1, 2]]  # even the sinks do not fit: the first of them


def test_snapkv_keeps_the_heaviest_keys_ties_by_index():
    c = candidates(
        2, [[0, 1, 2, 3, 4]], mass=[[0.5, 2.0, 0.1, 2.0, 0.0, 1.0, 1.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    )
    # positions 5..13 are scale 2; mass 3 (pos 7), 2 (pos 1, 3), then the 1.0s by index: 5, 6
    assert kept_positions(SnapKV(), c, 5) == [[1, 3, 5, 6, 7]]


def test_hack_budgets_are_asymmetric_and_average_to_the_budget():
    profile = PROFILES["mixed"]  # half the heads structural
    b_c, b_s = HACK(ratio=2.0).class_budgets(GEO, profile, 0.1)
    assert (b_c, b_s) == (28, 56)  # 42 / 1.5 and twice that
    assert (b_c + b_s) / 2 <= 42
    counts = HACK().plan(GEO, profile, 0.1)[-1]
    assert counts[0].tolist() == [28, 56, 28, 56]  # layer 0: heads 1 and 3 structural
    # the structural share may not pass the full prefix: the rest goes to the contextual heads
    assert HACK(ratio=2.0).class_budgets(GEO, profile, 0.9) == (338, 424)  # B = 381
    assert HACK().class_budgets(GEO, PROFILES["default"], 0.1) == (42, 42)  # all contextual


def test_hack_structural_heads_protect_first_scales_then_the_newest_contextual_by_mass():
    profile = PROFILES["mixed"]  # layer 0: head 0 contextual, head 1 structural
    stored = list(range(30))  # scales 0..3
    mass = torch.zeros(2, 30 + 25)
    mass[:, 10:16] = 5.0  # heavy keys of scale 2 and 3 (positions 10..15)
    mass[:, 30 + 7] = 1.0  # one current key (position 37) a little heavier than the rest
    c = candidates(4, [stored, stored], mass=mass, heads=[0, 1])
    contextual, structural = kept_positions(HACK(), c, 8, profile)
    assert contextual == [0, 10, 11, 12, 13, 14, 15, 37]  # by mass, ties by index (in position order)
    assert structural == [0, 1, 2, 3, 4, 30, 31, 37]  # sinks, then the newest scale by mass, by index
    # with room for the sinks and the whole newest scale, the rest goes by mass again
    assert kept_positions(HACK(), c, 32, profile)[1] == [0, 1, 2, 3, 4, 10, 11, *range(30, 55)]


def test_scalekv_drafters_get_the_large_budget_and_the_layer_mean_holds():
    profile = PROFILES["mixed"]
    layers = ScaleKV().layer_budgets(GEO, profile.layer_role[S - 1], 424, 42)
    assert profile.layer_role[S - 1] == ("drafter", "refiner", "drafter", "refiner")
    assert layers == [63, 21, 63, 21] and sum(layers) <= 4 * 42  # refiners half of B, drafters the rest
    one = ScaleKV().layer_budgets(GEO, ("drafter", "refiner", "refiner", "refiner"), 424, 42)
    assert one == [105, 21, 21, 21]
    assert ScaleKV().layer_budgets(GEO, ("drafter", "refiner", "refiner", "refiner"), 60, 42) == [
        60,
        36,
        36,
        36,
    ]
    plan = ScaleKV().plan(GEO, profile, 0.1)
    assert plan[-1, :, 0].tolist() == [63, 21, 63, 21]
    # the cache after scale 7 is read by scale 8, whose only drafter is layer 0; the slab holds a
    # layer at most what the last scale's roles give it
    assert plan[-2, :, 0].tolist() == [63, 21, 21, 21]
    assert bool((plan[:, :, 0:1] == plan).all())  # all heads of a layer keep the same count
    assert ScaleKV().layer_budgets(GEO, ("drafter",) * 4, 424, 42) == [42] * 4


def test_scalekv_keeps_its_observation_window_then_ranks_by_mass():
    assert grid_centres(16).tolist() == [y * 16 + x for y in (2, 6, 10, 14) for x in (2, 6, 10, 14)]
    assert grid_centres(3).tolist() == list(range(9)) and grid_centres(1).tolist() == [0]
    obs = GEO.starts[4] + grid_centres(5)  # of scale 4's 5x5 map: rows and columns 0, 1, 3, 4
    assert len(obs) == 16
    mass = torch.zeros(1, 30 + 25)
    mass[0, :5] = 9.0  # the sinks are heavy but not protected
    c = candidates(4, [list(range(30))], mass=mass, obs=obs)
    kept = kept_positions(ScaleKV(), c, 18)[0]
    assert kept == [0, 1, *obs.tolist()]


def test_scalekv_ranks_its_window_with_the_rest_when_the_budget_cannot_hold_both():
    """A segment keeping fewer than twice the window's 16 keys ranks them by mass with the stored
    prefix: protecting them would leave no room for any earlier scale."""
    obs = GEO.starts[4] + grid_centres(5)
    mass = torch.zeros(1, 30 + 25)
    mass[0, :5] = 9.0  # the 1x1 and 2x2 maps are heavy
    c = candidates(4, [list(range(30))], mass=mass, obs=obs)
    c.keep = torch.tensor([10])
    kept = kept_positions(ScaleKV(), c, 10)[0]
    assert kept[:5] == [0, 1, 2, 3, 4] and len(kept) == 10
    c.keep = torch.tensor([32])  # room for both: the window first
    assert set(obs.tolist()) <= set(kept_positions(ScaleKV(), c, 32)[0])


def test_heatkv_drops_the_least_score_per_token_and_protects_the_first_three_scales():
    profile = PROFILES["mixed"]
    keep = HeatKV().kept(GEO, profile, 0.1)  # (depth, H, S - 1)
    assert bool(keep[:, :, :3].all())  # protected
    kept_tokens = (keep.long() * torch.tensor(GEO.sizes[:-1])).sum()
    assert kept_tokens <= 42 * GEO.depth * GEO.num_heads
    # every dropped unprotected segment scores no higher per token freed than any kept one
    score = torch.tensor(profile.segment_score)[:, :, : S - 1] / torch.tensor(GEO.sizes[:-1])
    free = torch.zeros_like(keep)
    free[:, :, 3:] = True
    dropped, kept = score[free & ~keep], score[free & keep]
    assert len(kept) == 0 or dropped.max() <= kept.min()
    counts = HeatKV().plan(GEO, profile, 0.1)
    assert counts[2].tolist() == [[14] * 4] * 4  # scales 0..2 everywhere
    # below the sinks' own size even they go, the finest first
    tiny = HeatKV().kept(GEO, profile, 0.02)  # 8 tokens per segment on average
    assert not tiny[:, :, 3:].any() and tiny[:, :, :2].all() and not tiny[:, :, 2].all()


def test_observed_queries_are_spread_over_the_scale():
    assert strided_queries(10, 32).tolist() == list(range(10))
    q = strided_queries(169, 32)
    assert len(q) == 32 and len(set(q.tolist())) == 32 and q.min() >= 0 and q.max() < 169


def test_appended_segments_keep_every_stored_column_then_the_scales():
    from models.kv.compressed import _append_columns

    # candidates are [stored, padded to the longest (5) | the scale's 4]; the first segment takes
    # the scale, the second does not (heatkv drops a whole scale where its score is low)
    cols = _append_columns((3, 5), (7, 5), 4)
    assert cols.tolist() == [[0, 1, 2, 5, 6, 7, 8], [0, 1, 2, 3, 4, -1, -1]]


def test_the_store_ranks_exactly_the_scales_where_some_segment_drops_keys():
    from models.kv.compressed import SlabScaleStore

    geo = ScaleGeometry((1, 2, 3, 4), depth=2, num_heads=2)
    profile = KVProfile.default(geo.patch_nums, 2, 2)
    store = SlabScaleStore(
        geo, [(SnapKV(), 0.5, False), (Window(), 1.0, False)], profile, 8, torch.float32, "cpu"
    )
    (*_, snap_counts), (*_, all_counts) = store.groups
    before = 0
    for si in range(len(geo.sizes) - 1):
        for layer in range(2):
            dropped = bool(
                (snap_counts[si, layer] < (snap_counts[si - 1, layer] if si else 0) + geo.sizes[si]).any()
            )
            assert store._appends(snap_counts, layer, si) is (not dropped), (si, layer)
            assert store._appends(all_counts, layer, si) is True  # a budget of 1 keeps everything
            before += dropped
    assert before > 0  # the budget binds somewhere
