import pytest
import torch

from kernels import native
from kernels.attention import cached_attention, cached_attention_reference

needs_kernel = pytest.mark.skipif(
    native.load("attention") is None, reason="no C compiler for the CPU kernels"
)


def last(B: int, n_keys: int) -> torch.Tensor:
    """(B, 1) positions of a decode step that reads keys 0..n_keys-1."""
    return torch.full((B, 1), n_keys - 1)


def decode_attention(q, k, v, n_keys, key_valid=None):
    return cached_attention(q, k, v, last(q.shape[0], n_keys), key_valid)


def decode_attention_reference(q, k, v, n_keys, key_valid=None):
    return cached_attention_reference(q, k, v, last(q.shape[0], n_keys), key_valid)


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


@needs_kernel
def test_each_row_reads_its_own_length():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 4, 60, 32), torch.randn(3, 4, 60, 32)
    lengths = [1, 33, 60]
    out = cached_attention(q, k, v, torch.tensor(lengths)[:, None] - 1)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(
            out[b : b + 1], full_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], n)
        )


@pytest.mark.parametrize("window", [1, 2, 5, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_a_window_of_new_tokens_is_causal_inside_the_window(window, masked):
    """Several new tokens per row (a prefill tail or a verify window), rows at different lengths:
    query i of row b at position p reads keys 0..p, as full attention over that prefix."""
    torch.manual_seed(0)
    B, H, H_kv, D, T_max = 3, 4, 2, 16, 40
    q = torch.randn(B, H, window, D)
    k, v = torch.randn(B, H_kv, T_max, D), torch.randn(B, H_kv, T_max, D)
    first = torch.tensor([3, 10, 40 - window])  # each row's first new position
    positions = first[:, None] + torch.arange(window)
    key_valid = None
    if masked:
        key_valid = torch.rand(B, T_max) > 0.3
        key_valid[:, :1] = True
    out = cached_attention(q, k, v, positions, key_valid)
    for b in range(B):
        for i in range(window):
            p = int(positions[b, i])
            valid = None
            if key_valid is not None:
                valid = key_valid[b : b + 1].clone()
                valid[0, p] = True  # a query always sees its own key
            expected = full_attention(q[b : b + 1, :, i : i + 1], k[b : b + 1], v[b : b + 1], p + 1, valid)
            torch.testing.assert_close(out[b : b + 1, :, i : i + 1], expected, atol=2e-6, rtol=1e-5)
