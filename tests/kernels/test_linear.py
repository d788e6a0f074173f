import pytest
import torch
from torch import nn

from kernels import native
from kernels.linear import (
    INVARIANT_MIN_ROWS,
    BatchInvariantLinear,
    Linear,
    batch_invariant_linear,
    can_pack,
    is_packed,
    linear,
    linear_reference,
    pack_linear_weights,
    pack_weight,
    unpack_weight,
    weight_major_linear,
)

needs_kernel = pytest.mark.skipif(native.load("linear") is None, reason="no C compiler for the CPU kernels")


@needs_kernel
@pytest.mark.parametrize(
    "shape",
    # every register-tile remainder (1-7 rows past a multiple of 8), 3-D inputs and prefill sizes
    [
        (1, 40),
        (2, 40),
        (3, 40),
        (7, 40),
        (8, 40),
        (9, 40),
        (15, 40),
        (1, 1, 40),
        (2, 3, 40),
        (33, 40),
        (300, 40),
    ],
)
@pytest.mark.parametrize("n_out", [16, 32, 48, 64, 96, 208])  # 1, 2, 3, 4, 4 + 2, 3 x 4 + 1 panels
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_reference(shape, n_out, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(n_out, 40)
    b = torch.randn(n_out) if with_bias else None
    packed = pack_weight(w)
    assert is_packed(packed) and packed.shape == (n_out // 16, 40, 16)
    assert torch.equal(unpack_weight(packed), w)
    out = linear(x, packed, b)
    assert out.shape == (*shape[:-1], n_out)
    torch.testing.assert_close(out, linear_reference(x, w, b), atol=1e-4, rtol=1e-5)


@needs_kernel
def test_packed_linear_at_model_width_and_on_strided_rows():
    torch.manual_seed(0)
    x = torch.randn(4, 1536)[:, ::2]  # (4, 768), not contiguous
    w = torch.randn(2304, 768)
    torch.testing.assert_close(linear(x, pack_weight(w)), x @ w.T, atol=1e-3, rtol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows():
    # Batch independence of generated images rests on this: row 0 alone, with 1 or with 31 others.
    torch.manual_seed(0)
    x, w = torch.randn(32, 768), pack_weight(torch.randn(2304, 768))
    alone = linear(x[:1], w)
    assert torch.equal(alone, linear(x[:2], w)[:1])
    assert torch.equal(alone, linear(x, w)[:1])


@needs_kernel
@pytest.mark.parametrize("n_out", [48, 112, 2304])
def test_a_result_does_not_depend_on_the_threads_or_the_tile_width(n_out):
    # The kernel narrows its tiles (4, 2, 1 panels) when a product has too few panels for its
    # threads; every output is still one sum over k in order, so the bits stay.
    torch.manual_seed(0)
    x, w = torch.randn(9, 768), pack_weight(torch.randn(n_out, 768))
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 8, 64):
            torch.set_num_threads(n)
            outs.append(linear(x, w))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    torch.testing.assert_close(outs[0], x @ unpack_weight(w).T, atol=1e-3, rtol=1e-5)


@needs_kernel
def test_packed_linear_rejects_what_the_kernel_cannot_read():
    w = pack_weight(torch.randn(32, 8))
    with pytest.raises(TypeError, match="float32 CPU"):
        linear(torch.randn(2, 8, dtype=torch.float64), w)


def test_weights_that_cannot_be_packed_stay_as_they_are():
    for w in (
        torch.randn(8, 4, dtype=torch.float64),
        torch.randn(16, 4, dtype=torch.bfloat16),
        torch.randn(24, 4),  # not a whole number of 16-column panels
        torch.randn(16),
    ):
        assert not can_pack(w)
        assert pack_weight(w) is w
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(linear(x, w), x @ w.T)


@needs_kernel
def test_pack_linear_weights_swaps_every_linear_in_place():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32, bias=False), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 8))
    x = torch.randn(5, 16)
    expected = net(x)
    assert pack_linear_weights(net) == 2  # the last layer's 8 outputs are not a whole panel
    assert is_packed(net[0].weight) and is_packed(net[2].weight) and not is_packed(net[3].weight)
    h = linear(torch.nn.functional.gelu(linear(x, net[0].weight)), net[2].weight, net[2].bias)
    torch.testing.assert_close(linear(h, net[3].weight, net[3].bias), expected, atol=1e-5, rtol=1e-5)
    # the packed layers were swapped for modules whose own forward reads panels
    assert isinstance(net[0], Linear) and isinstance(net[2], Linear) and type(net[3]) is nn.Linear
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert set(net.state_dict()) == {"0.weight", "2.weight", "2.bias", "3.weight", "3.bias"}


def test_without_a_compiler_the_kernels_are_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VARSERVE_KERNEL_CACHE", str(tmp_path))
    native.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU kernels 'linear' unavailable"):
            assert native.load("linear") is None
    finally:
        native.load.cache_clear()


@needs_kernel
def test_the_build_is_cached_by_source_flags_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("VARSERVE_KERNEL_CACHE", str(tmp_path))
    first = native.build("linear")
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native.build("linear") == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (1, 1, 64), (2, 3, 64), (300, 64)])
def test_unpacked_cpu_weights_take_the_weight_major_path(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(48, 64), torch.randn(48)
    torch.testing.assert_close(weight_major_linear(x, w, b), x @ w.T + b, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear(x, w, b), x @ w.T + b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("N, K", [(384, 128), (512, 16), (128, 512)])
def test_batch_invariant_linear_gives_a_row_the_same_bits_in_any_call(N, K):
    g = torch.Generator().manual_seed(N + K)
    w, b, x = torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(64, K, generator=g)
    whole = batch_invariant_linear(x, w, b)
    torch.testing.assert_close(whole, x @ w.T + b, rtol=1e-5, atol=1e-4)
    for M in [*range(1, 2 * INVARIANT_MIN_ROWS), 63]:
        for start in (0, 64 - M):
            part = batch_invariant_linear(x[start : start + M], w, b)
            assert torch.equal(part, whole[start : start + M]), (M, start)
    # (B, l, K) inputs: the rows are what count, and the module keeps nn.Linear's parameters
    layer = BatchInvariantLinear(K, N)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x3 = x[:30].view(3, 10, K)
    assert torch.equal(layer(x3)[2], layer(x3[2:3])[0])
