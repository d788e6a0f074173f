"""The paged-attention kernels against their reference (each row's blocks gathered end to end, then
the dense cached attention): the C kernel on CPU and the Triton kernel under TRITON_INTERPRET=1,
over block sizes, ragged lengths, windows of 1..16 new tokens, grouped KV heads and padded
condition keys."""

import pytest
import torch

from kernels import native
from kernels.attention import cached_attention_reference
from kernels.paged_attention import (
    gather_blocks,
    paged_attention,
    paged_attention_cpu,
    paged_attention_reference,
    paged_attention_triton,
    triton,
)


def paged_case(lengths, S, H=4, H_kv=2, D=32, block_size=16, spare_blocks=3, seed=0, padded=False):
    """Rows of the given lengths (keys before the window) plus an S-token window each, their blocks
    scattered over a shuffled pool with unused blocks between them."""
    g = torch.Generator().manual_seed(seed)
    R = len(lengths)
    ends = [n + S for n in lengths]
    per_row = [-(-e // block_size) for e in ends]
    max_blocks = max(per_row) + 1
    n_blocks = sum(per_row) + spare_blocks
    order = torch.randperm(n_blocks, generator=g)
    k_pool = torch.randn(n_blocks, H_kv, block_size, D, generator=g)
    v_pool = torch.randn(n_blocks, H_kv, block_size, D, generator=g)
    table = torch.full((R, max_blocks), -1, dtype=torch.int32)  # never read past a row's blocks
    used = 0
    for r, nb in enumerate(per_row):
        table[r, :nb] = order[used : used + nb].to(torch.int32)
        table[r, nb:] = order[-1]  # a valid index the kernel must not read
        used += nb
    q = torch.randn(R, H, S, D, generator=g)
    positions = torch.tensor([[n + s for s in range(S)] for n in lengths])
    key_valid = None
    if padded:
        key_valid = torch.ones(R, max_blocks * block_size, dtype=torch.bool)
        for r in range(R):  # the first few condition positions padded, as a short caption
            key_valid[r, : min(3 + r, lengths[r])] = False
    return q, k_pool, v_pool, table, positions, key_valid


def test_gathered_blocks_are_the_rows_dense_cache():
    q, k_pool, v_pool, table, positions, _ = paged_case([5, 40], S=2)
    dense = gather_blocks(k_pool, table, 3)
    assert dense.shape == (2, 2, 48, 32)
    torch.testing.assert_close(dense[1, :, 16:32], k_pool[table[1, 1].long()])


def test_reference_equals_plain_attention_over_each_rows_prefix():
    q, k_pool, v_pool, table, positions, _ = paged_case([0, 7, 33], S=4, H=2, H_kv=2)
    out = paged_attention_reference(q, k_pool, v_pool, table, positions)
    for r in range(3):
        n = int(positions[r, -1]) + 1
        k = gather_blocks(k_pool, table[r : r + 1], table.shape[1])[:, :, :n]
        v = gather_blocks(v_pool, table[r : r + 1], table.shape[1])[:, :, :n]
        keys = torch.arange(n)
        mask = keys[None, :] <= positions[r, :, None]  # causal inside the window
        scores = (q[r] @ k[0].transpose(-1, -2)) / 32**0.5
        want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[0]
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)


CASES = [
    ([0], 1, 16, False),  # the first key only
    ([15, 16, 17], 1, 16, False),  # decode steps at block edges
    ([3, 100, 47, 64], 4, 16, True),  # a verify window, ragged rows, padded condition keys
    ([120, 1, 31], 16, 32, False),  # a 16-token window, bigger blocks
    ([9, 70], 7, 64, True),
]


@pytest.mark.skipif(native.load("attention") is None, reason="no C compiler: the C path is not built")
@pytest.mark.parametrize("lengths, S, block_size, padded", CASES)
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2), (8, 1)])
def test_c_kernel_matches_the_reference(lengths, S, block_size, padded, H, H_kv):
    args = paged_case(lengths, S, H, H_kv, D=64, block_size=block_size, padded=padded)
    got = paged_attention_cpu(*args)
    want = paged_attention_reference(*args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(paged_attention(*args), got)  # the CPU dispatch is the C kernel


@pytest.mark.parametrize(
    "kernel",
    [
        paged_attention_reference,
        pytest.param(
            paged_attention_cpu, marks=pytest.mark.skipif(native.load("attention") is None, reason="no C")
        ),
        pytest.param(paged_attention_triton, marks=pytest.mark.skipif(triton is None, reason="no triton")),
    ],
)
def test_a_mask_narrower_than_the_rows_counts_the_keys_past_it_valid(kernel):
    """key_valid covering only the condition positions (a caption's mask as it comes): every
    kernel takes the keys past its width as valid, as the same mask widened with True would say,
    and reads nothing past it."""
    q, k_pool, v_pool, table, positions, wide = paged_case([3, 100, 47], 4, padded=True)
    narrow = wide[:, :8].clone()
    got = kernel(q, k_pool, v_pool, table, positions, narrow)
    want = paged_attention_reference(q, k_pool, v_pool, table, positions, wide)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(triton is None, reason="triton is not installed")
@pytest.mark.parametrize("lengths, S, block_size, padded", CASES)
@pytest.mark.parametrize("H, H_kv", [(4, 2), (2, 2)])
def test_triton_kernel_matches_the_reference(lengths, S, block_size, padded, H, H_kv):
    args = paged_case(lengths, S, H, H_kv, D=32, block_size=block_size, padded=padded)
    got = paged_attention_triton(*args)
    want = paged_attention_reference(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(triton is None, reason="triton is not installed")
@pytest.mark.parametrize("D", [100, 72, 8])
def test_triton_kernel_takes_head_dims_that_are_not_a_power_of_two(D):
    # GPT-3B's heads are 100 wide: the kernel pads its lanes to 128 and masks them
    args = paged_case([3, 40], 4, 4, 2, D=D, block_size=16, padded=True)
    torch.testing.assert_close(
        paged_attention_triton(*args), paged_attention_reference(*args), atol=1e-5, rtol=1e-5
    )


@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_triton_kernel_in_half_precision():
    q, k_pool, v_pool, table, positions, key_valid = paged_case([20, 50], 3, padded=True)
    half = [t.to(torch.float16) for t in (q, k_pool, v_pool)]
    got = paged_attention_triton(*half, table, positions, key_valid)
    want = paged_attention_reference(q, k_pool, v_pool, table, positions, key_valid)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_paged_equals_the_dense_cache_it_pages():
    """The same keys laid out densely (the DenseTokenStore's buffer) give the same attention."""
    q, k_pool, v_pool, table, positions, key_valid = paged_case([10, 60, 33], 5, padded=True)
    n_blocks = table.shape[1]
    k = gather_blocks(k_pool, table, n_blocks)
    v = gather_blocks(v_pool, table, n_blocks)
    want = cached_attention_reference(q, k, v, positions, key_valid)
    torch.testing.assert_close(
        paged_attention(q, k_pool, v_pool, table, positions, key_valid), want, atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("kernel", ["c", "triton"])
def test_padding_columns_at_a_scratch_position_leave_the_real_queries_alone(kernel):
    """Speculative decoding pads a short window with columns at a scratch position past every
    real one: the real queries' outputs are the plain window's."""
    if kernel == "c" and native.load("attention") is None:
        pytest.skip("no C compiler")
    if kernel == "triton" and triton is None:
        pytest.skip("triton is not installed")
    q, k_pool, v_pool, table, positions, key_valid = paged_case([30, 12], 6, padded=True)
    scratch = table.shape[1] * 16 - 1
    padded = positions.clone()
    padded[1, 3:] = scratch  # row 1: a 3-token window, then padding
    run = paged_attention_cpu if kernel == "c" else paged_attention_triton
    got = run(q, k_pool, v_pool, table, padded, key_valid)
    want = paged_attention_reference(q, k_pool, v_pool, table, positions, key_valid)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :, :3], want[1, :, :3], atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(native.load("attention") is None, reason="no C compiler")
def test_c_kernel_gives_a_query_the_same_bits_alone_as_in_any_window():
    """A query's numbers depend only on its own position and keys: alone, in a window of real
    queries, or beside padding columns at the scratch position (whose longer rows once changed how
    its sums split between vector lanes and tail), so an image's tokens never move with its company."""
    q, k_pool, v_pool, table, positions, key_valid = paged_case([30, 12], 6, padded=True)
    scratch = table.shape[1] * 16 - 1
    padded = positions.clone()
    padded[1, 3:] = scratch
    window = paged_attention_cpu(q, k_pool, v_pool, table, padded, key_valid)
    for r, real in ((0, 6), (1, 3)):
        for s in range(real):
            alone = paged_attention_cpu(
                q[r : r + 1, :, s : s + 1], k_pool, v_pool, table[r : r + 1], positions[r : r + 1, s : s + 1],
                key_valid[r : r + 1],
            )  # fmt: skip
            assert torch.equal(window[r, :, s], alone[0, :, 0]), (r, s)


def padded_window_case():
    """Rows whose windows are narrower than the pass (a plain row beside a speculative one): the
    columns past a row's window sit at a scratch position, here the last of its table, whose block
    holds NaN. A kernel that read past the window would carry the NaN into the padding columns."""
    S, block_size = 6, 16
    q, k_pool, v_pool, table, positions, key_valid = paged_case([3, 40, 17], S, 4, 2, D=32, padded=True)
    scratch = table.shape[1] * block_size - 1
    windows = [1, 6, 4]
    for r, w in enumerate(windows):
        positions[r, w:] = scratch
    spare = int(table[0, -1])
    k_pool[spare], v_pool[spare] = float("nan"), float("nan")
    return (q, k_pool, v_pool, table, positions, key_valid), windows


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(
            paged_attention_cpu, marks=pytest.mark.skipif(native.load("attention") is None, reason="no C")
        ),
        pytest.param(paged_attention_triton, marks=pytest.mark.skipif(triton is None, reason="no triton")),
    ],
)
def test_padding_columns_read_no_further_than_their_rows_window(kernel):
    args, windows = padded_window_case()
    got = kernel(*args)
    assert torch.isfinite(got).all()  # the scratch block was never read
    q, k_pool, v_pool, table, positions, key_valid = args
    for r, w in enumerate(windows):  # the window's own columns: the reference's, over its keys
        real = (q[r : r + 1, :, :w], k_pool, v_pool, table[r : r + 1], positions[r : r + 1, :w])
        want = paged_attention_reference(*real, None if key_valid is None else key_valid[r : r + 1])
        torch.testing.assert_close(got[r : r + 1, :, :w], want, atol=2e-5, rtol=1e-5)
