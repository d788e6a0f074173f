"""kv_select's C kernel (kernels/cpu/kv_select.c) against its PyTorch reference: tiers, ties,
invalid columns, keeps of none and of every candidate, and bad keeps."""

import pytest
import torch

from kernels.kv_select import _c_kernel, select_columns, select_columns_cpu, select_columns_torch

pytestmark = pytest.mark.skipif(_c_kernel() is None, reason="no C compiler")
SELECTORS = [select_columns_torch, select_columns_cpu]


@pytest.mark.parametrize("fn", SELECTORS)
def test_tier_first_then_key_then_the_lower_column_and_columns_come_back_in_order(fn):
    tier = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    key = torch.tensor([[5.0, 0.0, 5.0, 9.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    valid = torch.tensor([[True] * 6, [True, True, True, False, True, True]])
    cols = fn(tier, key, valid, torch.tensor([4, 3]))
    # row 0: tier 1 (cols 1, 4), then key 9 (col 3), then the tie 5/5 goes to col 0
    # row 1: key 2 (col 4), then the ties 1.0 by index: cols 0, 1 (col 3 is not valid)
    assert cols.tolist() == [[0, 1, 3, 4], [0, 1, 4, -1]]
    assert fn(tier, key, valid, torch.tensor([0, 0])).shape == (2, 0)


@pytest.mark.parametrize("fn", SELECTORS)
def test_minus_zero_ties_with_zero_and_negative_keys_order_below_it(fn):
    tier, valid = torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool)
    key = torch.tensor([[-1.0, -0.0, 0.0, -2.0, 0.5]])
    # 0.5, then -0.0 and 0.0 are equal: the lower column; then -1 before -2
    assert fn(tier, key, valid, torch.tensor([2])).tolist() == [[1, 4]]
    assert fn(tier, key, valid, torch.tensor([4])).tolist() == [[0, 1, 2, 4]]


@pytest.mark.parametrize(
    "G, M, tiers, levels", [(7, 40, 1, 1000), (64, 593, 3, 1000), (16, 300, 3, 4), (5, 1, 2, 3)]
)
def test_c_kernel_equals_the_reference_on_random_segments(G, M, tiers, levels):
    g = torch.Generator().manual_seed(G * M)
    tier = torch.randint(0, tiers, (G, M), generator=g)
    # few distinct key levels make many ties, which the lower column must break the same way
    key = torch.randint(-levels, levels, (G, M), generator=g).float() / levels
    valid = torch.rand(G, M, generator=g) < 0.8
    valid[0] = True  # a segment with every column valid
    counts = valid.sum(1)
    keep = (torch.rand(G, generator=g) * (counts + 1)).long().clamp(max=counts)
    keep[-1] = counts[-1]  # a segment that keeps everything it has
    got = select_columns_cpu(tier, key, valid, keep)
    assert torch.equal(got, select_columns_torch(tier, key, valid, keep))
    assert torch.equal(select_columns(tier, key, valid, keep), got)


def test_a_keep_beyond_the_valid_candidates_is_an_error():
    valid = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="keeps more than its valid candidates"):
        select_columns_cpu(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), valid, torch.tensor([3]))


def test_non_float32_keys_take_the_reference():
    # float64 keys that float32 would tie: the reference's order, not the kernel's
    key = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    tier, valid = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
    assert select_columns(tier, key, valid, torch.tensor([1])).tolist() == [[1]]


@pytest.mark.parametrize("fn", SELECTORS)
def test_nan_keys_rank_above_everything_and_infinities_in_order(fn):
    nan = torch.tensor(float("nan"))
    key = torch.stack([torch.tensor(1.0), -nan, torch.tensor(float("inf")), nan, torch.tensor(-float("inf"))])
    tier, valid = torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool)
    # both NaNs (whatever their sign) first, by column; then +inf; then 1.0
    assert fn(tier, key[None], valid, torch.tensor([2])).tolist() == [[1, 3]]
    assert fn(tier, key[None], valid, torch.tensor([4])).tolist() == [[0, 1, 2, 3]]


def test_tiers_the_kernel_cannot_pack_take_the_reference():
    tier = torch.tensor([[0, 70000, 1, -1]])
    key = torch.zeros(1, 4)
    valid = torch.tensor([[True, True, True, False]])  # an invalid column may carry any tier
    assert select_columns(tier, key, valid, torch.tensor([2])).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="tier outside"):
        select_columns_cpu(tier, key, valid, torch.tensor([2]))
