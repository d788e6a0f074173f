import pytest
import torch

from kernels.linear import linear, linear_reference, weight_major_linear


@pytest.mark.parametrize(
    "shape", [(1, 64), (2, 64), (3, 64), (4, 64), (1, 1, 64), (2, 1, 64), (5, 64), (2, 3, 64), (300, 64)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(shape, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(200, 64)
    b = torch.randn(200) if with_bias else None
    out = linear(x, w, b)
    assert out.shape == (*shape[:-1], 200)
    torch.testing.assert_close(out, linear_reference(x, w, b), atol=1e-4, rtol=1e-5)


def test_weight_major_path_on_non_contiguous_rows():
    x = torch.randn(4, 128)[:, ::2]  # (4, 64), strided
    w = torch.randn(32, 64)
    torch.testing.assert_close(weight_major_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-5)
