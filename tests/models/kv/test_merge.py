"""kv_merge in the slab store (models/kv/compressed.py): evicted keys folded into their nearest kept
key, its log count on the kernel's logit. Exact where the folded keys equal the kept one; every
produced key is accounted for by the counts; keys stay unit; bytes count the log-count slab."""

import pytest
import torch
import torch.nn.functional as F

from kernels.kv_merge import sum_onto, sum_onto_dense
from kernels.scale_attention import scale_attention_reference
from models.kv.compressed import SlabScaleStore
from models.kv.policies import HACK, ScaleGeometry, SnapKV, ValueKV, Window, policy
from models.kv.profile import KVProfile
from models.kv.store import ScaleSpan

D = 16
GEO = ScaleGeometry((1, 2, 3, 4), depth=1, num_heads=2)  # 1 + 4 + 9 stored, the 4x4 map last


def store_of(p, budget, merge, rows=1, geo=GEO):
    profile = KVProfile.default(geo.patch_nums, geo.depth, geo.num_heads)
    return SlabScaleStore(geo, [(p, budget, merge)] * rows, profile, D, torch.float32, "cpu")


def run_scales(store, scales, rows=1):
    """scales: per scale (q, k, v) each (rows, H, n, D) -> the outputs of every scale."""
    return [run_scales_from(store, scales, si, rows) for si in range(len(scales))]


def run_scales_from(store, scales, si, rows=1):
    q, k, v = scales[si]
    start = store.geo.starts[si]
    at = ScaleSpan(slice(0, rows), start, start + k.shape[2])
    store.write(0, k, v, at)
    return store.attend(0, q, at)


def random_scales(geo=GEO, rows=1, seed=0, temperature=5.0):
    g = torch.Generator().manual_seed(seed)
    H = geo.num_heads
    return [
        (
            F.normalize(torch.randn(rows, H, n, D, generator=g), dim=-1) * temperature,
            F.normalize(torch.randn(rows, H, n, D, generator=g), dim=-1),
            torch.randn(rows, H, n, D, generator=g),
        )
        for n in geo.sizes
    ]


def segment_counts(store, si):
    """(segments,) the sum of each segment's counts after scale si."""
    layer = 0
    held = store._held[si + 1, layer]
    return torch.stack(
        [
            store.bias[layer][int(o) : int(o) + int(n)].exp().sum()
            for o, n in zip(store._offsets[layer].tolist(), held.tolist(), strict=True)
        ]
    )


@pytest.mark.parametrize("p", [SnapKV(), ValueKV(), Window(), HACK(), policy("heatkv")], ids=lambda p: p.name)
def test_the_counts_account_for_every_key_produced(p):
    store = store_of(p, 0.3, True, rows=2)  # 4 of 14 stored tokens per segment
    scales = random_scales(rows=2)
    produced = 0
    for si, n in enumerate(GEO.sizes[:-1]):  # scale by scale: the counts after each
        run_scales_from(store, scales, si, rows=2)
        produced += n
        counts = segment_counts(store, si)
        torch.testing.assert_close(counts, torch.full_like(counts, float(produced)), atol=1e-4, rtol=0)
    # merged keys keep the unit norm of VAR's l2-normalised keys
    held = store._held[-1, 0]
    for o, n in zip(store._offsets[0].tolist(), held.tolist(), strict=True):
        norms = store.k[0][o : o + n].norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_folding_equal_keys_is_exact():
    """Scale 1 repeats scale 0's key and value four times: a budget of one token keeps one of the
    five equal keys with count 5, and scale 2 then attends exactly as over the full prefix. Without
    merging it attends as if four of them were never there."""
    g = torch.Generator().manual_seed(1)
    H = GEO.num_heads
    k0 = F.normalize(torch.randn(1, H, 1, D, generator=g), dim=-1)
    v0 = torch.randn(1, H, 1, D, generator=g)
    scales = random_scales(seed=2)
    scales[0] = (scales[0][0], k0, v0)
    scales[1] = (scales[1][0], k0.expand(1, H, 4, D).clone(), v0.expand(1, H, 4, D).clone())
    budget = 1 / GEO.stored_len  # one token per segment
    merged = run_scales(store_of(SnapKV(), budget, True), scales)
    dropped = run_scales(store_of(SnapKV(), budget, False), scales)
    full = run_scales(store_of(policy("full"), 1.0, False), scales)
    torch.testing.assert_close(merged[2], full[2], atol=1e-5, rtol=1e-5)
    assert (dropped[2] - full[2]).abs().max() > 1e-2


def test_the_bias_slab_is_counted_and_only_where_rows_merge():
    plain, merged = store_of(SnapKV(), 0.3, False), store_of(SnapKV(), 0.3, True)
    assert plain.bias is None
    slots = sum(len(k) for k in merged.k)
    assert merged.nbytes == plain.nbytes + 4 * slots
    # full evicts nothing, nor does any policy at a budget of 1: no slab; heatkv folds the scales it drops
    assert store_of(policy("full"), 1.0, True).bias is None
    assert store_of(SnapKV(), 1.0, True).bias is None
    assert store_of(policy("heatkv"), 0.3, True).bias is not None


def test_merging_agrees_with_the_kernel_reference():
    """The store's attention over merged slots is the kernel reference's with the bias."""
    store = store_of(ValueKV(), 0.3, True)
    scales = random_scales(seed=4)
    outs = run_scales(store, scales[:-1])
    q, k, v = scales[-1]
    at = ScaleSpan(slice(0, 1), GEO.starts[-1], GEO.starts[-1] + k.shape[2])
    store.write(0, k, v, at)
    out = store.attend(0, q, at)
    si = len(GEO.sizes) - 1
    ref = scale_attention_reference(
        q, k, v, store.k[0], store.v[0], store.offsets[0], store.lengths[si, 0], bias_slab=store.bias[0]
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(outs) == len(GEO.sizes) - 1


def test_sums_onto_slots_by_index_add_equal_the_one_hot_product():
    # the CPU path (index_add) and the one GPUs take (a one-hot product, deterministic there)
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, 7, (3, 40), generator=g)
    x = torch.randn(3, 40, 9, generator=g)
    got = sum_onto(target, x, 7)
    assert got.shape == (3, 7, 9)
    torch.testing.assert_close(got, sum_onto_dense(target, x, 7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 2], x[1][target[1] == 2].sum(0), atol=1e-5, rtol=1e-5)
