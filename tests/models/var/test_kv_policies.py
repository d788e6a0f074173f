"""The compressed scale store inside the VAR engine: `full` through it equals the dense store, every
policy's stored bytes hold its budget, segments hold what the plan says, guidance rows are their own
segments, and an image does not depend on its batch under any policy."""

import pytest
import torch

from models.config import DEFAULT_CONFIG
from models.kv.compressed import SlabScaleStore
from models.kv.policies import KV_POLICIES, ScaleGeometry, policy
from models.kv.profile import KVProfile
from models.settings import ImageSettings
from models.var import generate as engine
from models.var.loading import load_var
from tests.models.kv.test_policies import mixed_profile

BUNDLED = DEFAULT_CONFIG.parent
SHAPES = dict(cfg=2.0, top_k=20, top_p=0.0)  # the bundled model's defaults


@pytest.fixture(scope="module")
def shapes():
    model, vae = load_var(BUNDLED / "var_shapes.safetensors", BUNDLED / "var_shapes_vae.safetensors")
    c = model.cfg
    return model, vae, mixed_profile(ScaleGeometry(c.patch_nums, c.depth, c.num_heads))


def geometry(model) -> ScaleGeometry:
    c = model.cfg
    return ScaleGeometry(tuple(c.patch_nums), c.depth, c.num_heads)


def capture_stores(monkeypatch, force: str | None = None) -> list:
    """Record the stores the engine builds; with `force`, every row goes through the slab store
    with that policy (at budget 1), whatever the settings say."""
    stores, build = [], engine.scale_store

    def spy(model, settings, guided, profile):
        store, full = build(model, settings, guided, profile)
        if force is not None:
            geo = geometry(model)
            rows = [(policy(force), 1.0, False)] * (2 * len(settings) if guided else len(settings))
            profile = profile or KVProfile.default(geo.patch_nums, geo.depth, geo.num_heads)
            store = SlabScaleStore(geo, rows, profile, model.cfg.head_dim, torch.float32, "cpu")
        stores.append(store)
        return store, full

    monkeypatch.setattr(engine, "scale_store", spy)
    return stores


def tokens(out) -> torch.Tensor:
    return torch.cat(out.tokens, dim=1)


@pytest.mark.parametrize("which", ["fixture", "bundled"])
def test_full_through_the_slab_store_gives_the_dense_stores_tokens(which, var_pair, shapes, monkeypatch):
    model, vae = var_pair if which == "fixture" else shapes[:2]
    base = dict(cfg=1.5, top_k=900, top_p=0.96) if which == "fixture" else SHAPES
    params = [ImageSettings(seed=7 + i, **base) for i in range(3)]
    labels = [1, 4, 6]
    dense = engine.generate(model, vae, labels, params, decode=False)
    stores = capture_stores(monkeypatch, force="full")
    slab = engine.generate(model, vae, labels, params, decode=False)
    assert isinstance(stores[0], SlabScaleStore)
    assert torch.equal(tokens(slab), tokens(dense))
    assert slab.kv_bytes == dense.kv_bytes == dense.kv_bytes_full  # the same 424 positions
    assert dense.kv_bytes < slab.kv_bytes_working < dense.kv_bytes_working  # one layer's scale, not all


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 0.05])
@pytest.mark.parametrize("name", KV_POLICIES)
def test_stored_bytes_hold_the_budget(name, budget, shapes, monkeypatch):
    model, vae, profile = shapes
    c = model.cfg
    stores = capture_stores(monkeypatch)
    params = [ImageSettings(seed=3, kv_policy=name, kv_budget=budget, **SHAPES)]
    out = engine.generate(model, vae, [2], params, decode=False, profile=profile)
    per_token = 2 * c.depth * 2 * c.num_heads * c.head_dim * 4  # K and V, 2 guided rows, fp32
    assert out.kv_bytes_full == 424 * per_token
    if name == "full":
        assert out.kv_bytes == out.kv_bytes_full
        return
    # the budget counts tokens per segment, rounded down: floor(b * 424) per (row, layer, head) at most
    assert out.kv_bytes <= budget * out.kv_bytes_full
    assert out.kv_bytes >= (budget - (169 if name == "heatkv" else 1) / 424) * out.kv_bytes_full
    # the working peak adds one group of rows' last scale for one layer: 2 rows x 256 tokens
    last = 2 * 2 * c.num_heads * 256 * c.head_dim * 4
    assert out.kv_bytes_working == out.kv_bytes + last
    (store,) = stores
    geo = geometry(model)
    plan = policy(name).plan(geo, profile, budget)
    for layer in range(c.depth):
        for seg in range(2 * c.num_heads):  # both rows of the guided image
            for si in range(len(c.patch_nums) - 1):
                held = store._held[si + 1, layer, seg]
                assert held == plan[si, layer, seg % c.num_heads]
            kept = store.segment_positions(layer, seg, len(c.patch_nums) - 2)
            assert len(kept) == len(set(kept.tolist())) and bool((kept[1:] > kept[:-1]).all())  # in order
            assert bool((kept >= 0).all() & (kept < 424).all())


def test_segments_hold_what_window_and_heatkv_say(shapes, monkeypatch):
    model, vae, profile = shapes
    geo, last = geometry(model), len(model.cfg.patch_nums) - 2
    stores = capture_stores(monkeypatch)
    engine.generate(
        model, vae, [0], [ImageSettings(kv_policy="window", kv_budget=0.1, **SHAPES)], decode=False
    )
    # 42 per segment: the 1x1 and 2x2 maps, then the 37 most recent of the 424
    assert stores[-1].segment_positions(2, 5, last).tolist() == [0, 1, 2, 3, 4, *range(387, 424)]
    engine.generate(
        model,
        vae,
        [0],
        [ImageSettings(kv_policy="heatkv", kv_budget=0.1, **SHAPES)],
        decode=False,
        profile=profile,
    )
    keep = policy("heatkv").kept(geo, profile, 0.1)
    for layer, seg in [(0, 0), (1, 3), (3, 6)]:
        h = seg % geo.num_heads
        want = [
            p for s in range(last + 1) if keep[layer, h, s] for p in range(geo.starts[s], geo.starts[s + 1])
        ]
        assert stores[-1].segment_positions(layer, seg, last).tolist() == want


def test_guidance_rows_are_segments_of_their_own(shapes, monkeypatch):
    model, vae, profile = shapes
    stores = capture_stores(monkeypatch)
    guided = ImageSettings(seed=1, kv_policy="snapkv", kv_budget=0.1, **SHAPES)
    a = engine.generate(model, vae, [4, 5], [guided, guided], decode=False)
    H, last = model.cfg.num_heads, len(model.cfg.patch_nums) - 2
    # rows 0, 1 conditional, 2, 3 their null-class rows: each ranks by its own queries' mass
    differs = [
        not torch.equal(
            stores[-1].segment_positions(layer, h, last), stores[-1].segment_positions(layer, 2 * H + h, last)
        )
        for layer in range(model.cfg.depth)
        for h in range(H)
    ]
    assert any(differs)
    b = engine.generate(
        model,
        vae,
        [4, 5],
        [ImageSettings(seed=1, kv_policy="snapkv", kv_budget=0.1, top_k=20, cfg=0.0)] * 2,
        decode=False,
    )
    assert a.kv_bytes == 2 * b.kv_bytes  # unguided: no null rows, half the segments


MERGING = [n for n in KV_POLICIES if policy(n).evicts]


@pytest.mark.parametrize("name, merge", [(n, False) for n in KV_POLICIES] + [(n, True) for n in MERGING])
def test_an_image_does_not_depend_on_its_batch(name, merge, shapes):
    model, vae, profile = shapes
    labels = [3, 0, 7]
    params = [
        ImageSettings(
            seed=50 + i,
            kv_policy=name,
            kv_budget=0.1,
            kv_merge=merge,
            cfg=1.0 + i,
            top_k=20,
            temperature=0.8 + 0.2 * i,
        )
        for i in range(3)
    ]
    batch = engine.generate(model, vae, labels, params, decode=False, profile=profile)
    for i in range(3):
        alone = engine.generate(model, vae, [labels[i]], [params[i]], decode=False, profile=profile)
        for si, (x, y) in enumerate(zip(batch.tokens, alone.tokens, strict=True)):
            assert torch.equal(x[i], y[0]), (name, i, si)


@pytest.mark.parametrize("name", ["snapkv", "hack", "scalekv", "valuekv"])
def test_the_mass_from_the_attention_pass_ranks_as_a_separate_mass_call(name, shapes, monkeypatch):
    """On CPU a ranking policy's mass comes out of the scale's attention pass; the tokens are those
    of the separate attention_mass call that runs elsewhere (or for rows of several policies)."""
    from models.kv import compressed

    model, vae, profile = shapes
    params = [
        ImageSettings(seed=20 + i, kv_policy=name, kv_budget=b, **SHAPES) for i, b in enumerate((0.1, 0.5))
    ]
    fused_calls, fused = [], compressed.scale_attention_with_mass_cpu

    def counting(*args, **kwargs):
        fused_calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(compressed, "scale_attention_with_mass_cpu", counting)
    runs = [
        engine.generate(model, vae, [i], [p], decode=False, profile=profile) for i, p in enumerate(params)
    ]
    assert fused_calls, "the attention pass never gave the mass"
    monkeypatch.setattr(compressed, "scale_attention_with_mass_cpu", lambda *a, **k: None)
    for i, (p, run) in enumerate(zip(params, runs, strict=True)):
        apart = engine.generate(model, vae, [i], [p], decode=False, profile=profile)
        assert torch.equal(tokens(run), tokens(apart)), (name, p.kv_budget)


def test_the_mass_call_gets_the_forward_lse_of_its_queries(shapes, monkeypatch):
    """Where the mass does not come out of the attention pass (a GPU; here rows of two policies in
    one store), the pass hands its LSE to the mass call, so that Triton's mass kernel does not run
    the forward again: for exactly the call's rows and observed queries (checked against the
    PyTorch forward's LSE). The tokens are those of each image alone."""
    from kernels.scale_attention import scale_attention_torch
    from models.kv import compressed

    model, vae, profile = shapes
    params = [ImageSettings(seed=30, kv_policy="snapkv", kv_budget=0.25, **SHAPES)]
    params.append(ImageSettings(seed=31, kv_policy="hack", kv_budget=0.1, **SHAPES))
    calls, mass = [], compressed.attention_mass

    def checking(q, k_cur, k_slab, offsets, lengths, scale=1.0, lse=None, max_len=None, bias_slab=None):
        _, want = scale_attention_torch(
            q, k_cur, k_cur, k_slab, k_slab, offsets, lengths, scale, True, bias_slab
        )
        torch.testing.assert_close(lse, want, atol=1e-4, rtol=1e-5)
        calls.append(q.shape)
        return mass(q, k_cur, k_slab, offsets, lengths, scale, lse, max_len, bias_slab)

    monkeypatch.setattr(compressed, "attention_mass", checking)
    both = engine.generate(model, vae, [0, 1], params, decode=False, profile=profile)
    assert calls and all(shape[0] == 2 for shape in calls)  # each policy's two rows (cond, null)
    for i, p in enumerate(params):
        alone = engine.generate(model, vae, [i], [p], decode=False, profile=profile)
        assert torch.equal(torch.cat([t[i : i + 1] for t in both.tokens], 1), tokens(alone)), p.kv_policy


def test_rows_of_several_policies_share_a_store(shapes, monkeypatch):
    """The runner takes any mix (the server batches one policy at a time): each row is planned by
    its own policy and the batch's bytes are the sum of its images'."""
    model, vae, profile = shapes
    stores = capture_stores(monkeypatch)
    params = [
        ImageSettings(seed=i, kv_policy=p, kv_budget=b, **SHAPES)
        for i, (p, b) in enumerate([("full", 1.0), ("hack", 0.1), ("heatkv", 0.25), ("window", 0.05)])
    ]
    mixed = engine.generate(model, vae, [0, 1, 2, 3], params, decode=False, profile=profile)
    alone = [
        engine.generate(model, vae, [i], [p], decode=False, profile=profile) for i, p in enumerate(params)
    ]
    assert mixed.kv_bytes == sum(a.kv_bytes for a in alone)
    assert mixed.kv_bytes_full == sum(a.kv_bytes_full for a in alone)
    store, H = stores[0], model.cfg.num_heads
    for row, p in enumerate(params):
        plan = policy(p.kv_policy).plan(geometry(model), profile, p.kv_budget)
        for r in (row, row + len(params)):  # the image's conditional and null-class rows
            assert torch.equal(store._held[1:, :, r * H : (r + 1) * H], plan)


def test_the_runner_takes_kv_settings_and_reports_the_bytes(tmp_path):
    """What a benchmark script does: runner.generate with kv_policy / kv_budget in the settings."""
    from models.config import load_config
    from models.runner import load_runner
    from models.settings import SettingError
    from models.var.runner import load_profile

    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes")
    runner = load_runner(spec)
    assert spec.kv_profile is not None  # the bundled model ships its calibrated profile
    assert runner.kv_profile == KVProfile.load(spec.kv_profile)
    settings = [ImageSettings(seed=s, kv_policy="scalekv", kv_budget=0.25, **SHAPES) for s in (1, 2)]
    result = runner.generate(["star", "ring"], settings)
    assert result.images.shape == (2, 3, 64, 64)
    assert result.kv_bytes_full == 424 * 2 * 4 * 4 * 4 * 32 * 4  # 4 rows, 4 layers, 4 heads of 32, fp32
    # the calibrated profile's drafters and refiners share the budget: at most 106 tokens each on average
    assert 0.2 * result.kv_bytes_full <= result.kv_bytes <= 106 * 2 * 4 * 4 * 4 * 32 * 4
    assert result.kv_bytes < result.kv_bytes_working < result.kv_bytes_full
    for bad, field in [(dict(kv_policy="lru"), "kv_policy"), (dict(kv_budget=0.0), "kv_budget")]:
        with pytest.raises(SettingError) as err:
            runner.check(ImageSettings(**bad))
        assert err.value.field == field

    profile = mixed_profile(geometry(runner.model))
    path = tmp_path / "var-shapes.kvprofile.json"
    profile.save(path)
    assert load_profile(path, runner.model.cfg.patch_nums, 4, 4) == profile
    with pytest.raises(ValueError, match="a KV profile of patch_nums"):
        load_profile(path, runner.model.cfg.patch_nums, 4, 8)
