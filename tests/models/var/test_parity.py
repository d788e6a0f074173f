"""VAR and its VQ-VAE against outputs of the official code (fixtures' README)."""

import pytest
import torch

from kernels.attention import attention
from models.settings import ImageSettings
from models.var.generate import generate
from models.var.model import block_causal_attention, block_causal_bias, unmasked_scales


def test_teacher_forced_logits_match_reference(var_pair, var_reference):
    var, vae = var_pair
    ref = var_reference
    with torch.inference_mode():
        logits = var(ref["labels"], vae.quantize.teacher_inputs(ref["gt_idx"]))  # (B, 680, V)
    assert logits.shape == (2, 680, 4096)
    torch.testing.assert_close(logits[..., :256], ref["logits_head"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), ref["logits_lse"], atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), ref["logits_argmax"])


def test_vqvae_decode_matches_reference(var_pair, var_reference):
    _, vae = var_pair
    with torch.inference_mode():
        img = vae.idx_to_img(var_reference["gt_idx"])
    torch.testing.assert_close(img, var_reference["img_from_idx"], atol=1e-4, rtol=0)


def test_vqvae_multiscale_encode_matches_reference(var_pair, var_reference):
    _, vae = var_pair
    with torch.inference_mode():
        idx = vae.img_to_idx(var_reference["input_img"])
    assert [t.shape[1] for t in idx] == [pn * pn for pn in vae.cfg.patch_nums]
    for ours, theirs in zip(idx, var_reference["encoded_idx"], strict=True):
        assert torch.equal(ours, theirs)


def test_greedy_generation_gives_reference_image(var_pair, var_reference):
    var, vae = var_pair
    out = generate(var, vae, [3, 7], [ImageSettings(top_k=1, cfg=1.5, cfg_schedule="linear")] * 2)
    ref = var_reference["greedy_cfg15_img"]
    assert out.images.shape == ref.shape == (2, 3, 256, 256)
    close = (out.images - ref).abs() <= 1 / 255
    assert close.float().mean() >= 0.99


def test_cached_generation_agrees_with_teacher_forced_pass(var_pair):
    """The KV-cached scale-by-scale loop and the one-pass block-causal forward are the same model:
    the greedy tokens, fed back with teacher forcing, are the argmax of the guided logits."""
    var, vae = var_pair
    labels = [1, 8]
    out = generate(var, vae, labels, [ImageSettings(top_k=1, cfg=2.0)] * 2, decode=False)
    with torch.inference_mode():
        inputs = vae.quantize.teacher_inputs(out.tokens)
        cond = var(torch.tensor(labels), inputs)
        uncond = var(torch.full((2,), var.cfg.num_classes), inputs)
    start, n = 0, len(var.cfg.patch_nums)
    for si, pn in enumerate(var.cfg.patch_nums):
        t = 2.0 * si / (n - 1)
        guided = (1 + t) * cond[:, start : start + pn * pn] - t * uncond[:, start : start + pn * pn]
        assert (guided.argmax(-1) == out.tokens[si]).float().mean() >= 0.99, f"scale {si}"
        start += pn * pn


@pytest.mark.parametrize(
    "patch_nums",
    [(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 4), (8, 9), (1, 7, 8, 3)],
    ids=["published", "all-small", "all-large", "large-then-small"],
)
def test_split_teacher_forced_attention_equals_masked_attention(patch_nums):
    """The teacher-forced pass runs large scales unmasked on a key prefix: the same outputs and the
    same gradients as one call under the block-causal mask, whichever scales are large."""
    g = torch.Generator().manual_seed(0)
    L = sum(p * p for p in patch_nums)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g).requires_grad_() for _ in range(3))
    bias = block_causal_bias(patch_nums)
    want = attention(q, k, v, bias, scale=1.0)
    (dq, dk, dv) = torch.autograd.grad(want.square().sum(), (q, k, v))
    got = block_causal_attention(q, k, v, bias, unmasked_scales(patch_nums))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for ours, theirs in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), (dq, dk, dv), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
