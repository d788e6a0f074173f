import pytest
import torch

from kernels import native
from kernels.attention import decode_attention, decode_attention_reference

needs_kernel = pytest.mark.skipif(
    native.load("attention") is None, reason="no C compiler for the CPU kernels"
)


def full_attention(q, k, v, n_keys, key_valid=None):
    """Plain softmax(q k^T / sqrt(D)) v over the first n_keys positions, heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k[:, :, :n_keys].repeat_interleave(group, 1)
    v = v[:, :, :n_keys].repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :n_keys], -torch.inf)
    return scores.softmax(-1) @ v


@needs_kernel
@pytest.mark.parametrize("B,H,H_kv,D", [(1, 1, 1, 16), (2, 12, 12, 64), (3, 8, 2, 64), (2, 4, 4, 40)])
@pytest.mark.parametrize("n_keys", [1, 2, 17, 130])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_reference(B, H, H_kv, D, n_keys, masked):
    torch.manual_seed(0)
    T_max = 140
    q = torch.randn(B, H, 1, D)
    k, v = torch.randn(B, H_kv, T_max, D), torch.randn(B, H_kv, T_max, D)
    key_valid = None
    if masked:
        key_valid = torch.rand(B, T_max) > 0.3
        key_valid[:, n_keys - 1] = True  # the new token's own key is never padding
    out = decode_attention(q, k, v, n_keys, key_valid)
    assert out.shape == (B, H, 1, D)
    expected = decode_attention_reference(q, k, v, n_keys, key_valid)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, full_attention(q, k, v, n_keys, key_valid), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_decode_attention_ignores_positions_past_n_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 4, 50, 32), torch.randn(2, 4, 50, 32)
    out = decode_attention(q, k, v, 20)
    k[:, :, 20:], v[:, :, 20:] = torch.nan, torch.nan  # stale or never written
    assert torch.equal(decode_attention(q, k, v, 20), out)


@needs_kernel
def test_a_sequences_result_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    q, k, v = torch.randn(16, 12, 1, 64), torch.randn(16, 12, 100, 64), torch.randn(16, 12, 100, 64)
    alone = decode_attention(q[:1], k[:1], v[:1], 77)
    assert torch.equal(alone, decode_attention(q, k, v, 77)[:1])


def test_other_dtypes_take_the_reference_path():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, *s, dtype=torch.float64) for s in ((1, 16), (30, 16), (30, 16)))
    torch.testing.assert_close(decode_attention(q, k, v, 10), full_attention(q, k, v, 10))


@needs_kernel
def test_without_the_extra_math_library_the_plain_build_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("VARSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setitem(native.EXTRA, "attention", (["-ffast-math"], ["-lno-such-library"]))
    native.load.cache_clear()
    try:
        lib = native.load("attention")
        assert lib is not None and hasattr(lib, "varserve_decode_attention")
        assert [p.name for p in tmp_path.iterdir()] == [native.build("attention", extra=False).name]
    finally:
        native.load.cache_clear()
