"""The next-scale engine: batch independence, per-request settings, cache accounting, callbacks."""

import torch

from models.settings import ImageSettings
from models.var.generate import generate


def test_image_does_not_depend_on_its_batch(var_pair):
    var, vae = var_pair
    labels = [i % 10 for i in range(16)]
    params = [ImageSettings(top_k=900, top_p=0.96, cfg=1.5 + 0.25 * (i % 3), seed=100 + i) for i in range(16)]
    batch = generate(var, vae, labels, params)
    for i in (0, 6, 15):
        alone = generate(var, vae, [labels[i]], [params[i]])
        for si, (a, b) in enumerate(zip(batch.tokens, alone.tokens, strict=True)):
            assert torch.equal(a[i], b[0]), f"image {i}, scale {si}"
        assert torch.equal(batch.images[i], alone.images[0]), i  # bit for bit


def test_an_images_code_maps_refine_to_the_same_bits_alone_or_in_a_batch(var_pair):
    """The phi convolutions (the next scale's input) take one layout whatever the batch: an image's
    f_hat contribution is the same bits alone as in a batch of 5, at every scale."""
    _, vae = var_pair
    q, g = vae.quantize, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for si, pn in enumerate(q.patch_nums):
            idx = torch.randint(0, q.embedding.num_embeddings, (5, pn * pn), generator=g)
            batch = q.scale_residual(si, q.code_map(idx))
            for i in (0, 3):
                assert torch.equal(q.scale_residual(si, q.code_map(idx[i : i + 1])), batch[i : i + 1]), (
                    si,
                    i,
                )


def test_same_seed_same_image_other_seed_other_image(var_pair):
    var, vae = var_pair
    p = ImageSettings(top_k=900, top_p=0.96, cfg=1.5)
    out = generate(
        var, vae, [4, 4, 4], [p, p, ImageSettings(top_k=900, top_p=0.96, cfg=1.5, seed=1)], decode=False
    )
    assert torch.equal(out.tokens[-1][0], out.tokens[-1][1])
    assert not torch.equal(out.tokens[-1][0], out.tokens[-1][2])


def test_kv_bytes_count_the_prefix_the_last_scale_reads_as_stored(var_pair):
    var, vae = var_pair
    c = var.cfg
    guided = generate(var, vae, [1, 2], [ImageSettings(cfg=1.5, top_k=1)] * 2, decode=False)
    # K and V, every layer, both CFG halves, fp32: stored are the 424 positions of the scales before
    # the last (the paper's accounting); working adds the last scale's 256
    per_position = 2 * c.depth * 4 * c.num_heads * c.head_dim * 4
    assert c.seq_len - c.patch_nums[-1] ** 2 == 424
    assert guided.kv_bytes == guided.kv_bytes_full == per_position * 424
    assert guided.kv_bytes_working == per_position * c.seq_len
    unguided = generate(var, vae, [1, 2], [ImageSettings(cfg=0.0, top_k=1)] * 2, decode=False)
    assert unguided.kv_bytes == guided.kv_bytes // 2
    assert guided.forward_passes == len(c.patch_nums)


def test_unguided_rows_ignore_the_null_class(var_pair):
    """cfg = 0 must give the conditional model's argmax, whether or not the batch is doubled."""
    var, vae = var_pair
    alone = generate(var, vae, [5], [ImageSettings(cfg=0.0, top_k=1)], decode=False)
    mixed = generate(
        var, vae, [5, 6], [ImageSettings(cfg=0.0, top_k=1), ImageSettings(cfg=3.0, top_k=1)], decode=False
    )
    for a, b in zip(alone.tokens, mixed.tokens, strict=True):
        assert (a[0] == b[0]).float().mean() >= 0.99


def test_constant_schedule_differs_from_ramp(var_pair):
    var, vae = var_pair
    ramp = generate(var, vae, [2], [ImageSettings(cfg=3.0, top_k=1)], decode=False)
    const = generate(var, vae, [2], [ImageSettings(cfg=3.0, top_k=1, cfg_schedule="constant")], decode=False)
    plain = generate(var, vae, [2], [ImageSettings(cfg=0.0, top_k=1)], decode=False)
    assert torch.equal(ramp.tokens[0], plain.tokens[0])  # the ramp starts at t = 0
    assert any(not torch.equal(a, b) for a, b in zip(ramp.tokens, const.tokens, strict=True))


def test_on_scale_reports_every_scale_with_growing_f_hat(var_pair):
    var, vae = var_pair
    steps = []
    generate(
        var,
        vae,
        [3],
        [ImageSettings(top_k=1, cfg=1.5)],
        on_scale=lambda s: steps.append((s.index, s.tokens.shape, s.f_hat.norm().item())),
    )
    assert [s[0] for s in steps] == list(range(10))
    assert [s[1] for s in steps] == [(1, pn * pn) for pn in var.cfg.patch_nums]
    assert all(s[2] > 0 for s in steps)
    assert steps[0][2] != steps[-1][2]
