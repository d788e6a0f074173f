"""The next-token engine and a LlamaGen model behind the runner: per-request settings, batch
independence, guidance, callbacks, text prompts."""

import dataclasses

import pytest
import torch

from models.config import ModelSpec
from models.llamagen.generate import decode_tokens, generate, greedy_generate
from models.llamagen.loading import load_gpt, load_vq
from models.loading import CheckpointError
from models.runner import load_runner
from models.settings import ImageSettings, SamplingDefaults
from tests.conftest import REFERENCE
from tests.models.test_text import make_tiny_t5


@pytest.fixture(scope="module")
def c2i():
    return load_gpt(REFERENCE / "llamagen_c2i.pt", n_head=2, image_size=256)


@pytest.fixture(scope="module")
def vq():
    return load_vq(REFERENCE / "llamagen_vq.pt")


def test_image_does_not_depend_on_its_batch(c2i, vq):
    labels = torch.tensor([i % 10 for i in range(8)])
    params = [
        ImageSettings(
            top_k=[0, 100, 2000][i % 3], top_p=[1.0, 0.9][i % 2], cfg=[4.0, 1.0, 2.0][i % 3], seed=i
        )
        for i in range(8)
    ]
    batch = generate(c2i, vq, labels, params)
    for i in (0, 4, 7):
        alone = generate(c2i, vq, labels[i : i + 1], [params[i]])
        assert torch.equal(batch.tokens[i], alone.tokens[0]), i
        assert torch.equal(batch.images[i], alone.images[0]), i  # bit for bit
    assert batch.images.shape == (8, 3, 256, 256)
    assert 0 <= batch.images.min() and batch.images.max() <= 1


def test_top_k_one_is_greedy_and_seeds_matter_otherwise(c2i, vq):
    labels = torch.tensor([3, 3])
    greedy = greedy_generate(c2i, labels, cfg_scale=4.0)
    sampled = generate(
        c2i, vq, labels, [ImageSettings(top_k=1, cfg=4.0, seed=s) for s in (1, 2)], decode=False
    )
    assert torch.equal(sampled.tokens, greedy)
    free = generate(c2i, vq, labels, [ImageSettings(cfg=4.0, seed=s) for s in (1, 2)], decode=False)
    assert not torch.equal(free.tokens[0], free.tokens[1])


def test_guidance_scale_one_in_a_guided_batch_is_plain_conditional(c2i, vq):
    plain = greedy_generate(c2i, torch.tensor([5]), cfg_scale=1.0)
    mixed = generate(
        c2i, vq, torch.tensor([5, 6]), [ImageSettings(top_k=1, cfg=c) for c in (1.0, 4.0)], decode=False
    )
    assert (mixed.tokens[0] == plain[0]).float().mean() >= 0.99


def test_cfg_interval_stops_guidance_after_its_token(c2i, vq):
    full = generate(c2i, vq, torch.tensor([2]), [ImageSettings(top_k=1, cfg=4.0)], decode=False)
    early = generate(
        c2i, vq, torch.tensor([2]), [ImageSettings(top_k=1, cfg=4.0, cfg_interval=3)], decode=False
    )
    assert torch.equal(full.tokens[0, :4], early.tokens[0, :4])
    assert not torch.equal(full.tokens, early.tokens)


def test_rows_are_reported_and_previews_grey_out_the_rest(c2i, vq):
    steps = []
    out = generate(c2i, vq, torch.tensor([1]), [ImageSettings(seed=3, cfg=4.0)], on_row=steps.append)
    assert [s.index for s in steps] == list(range(16)) and {s.total for s in steps} == {16}
    assert [s.tokens.shape[1] for s in steps] == [16 * (i + 1) for i in range(16)]
    preview = decode_tokens(vq, steps[3].tokens, 16)  # 4 of 16 rows done
    assert (preview[:, :, 64:] == 0.5).all() and not (preview[:, :, :64] == 0.5).all()
    torch.testing.assert_close(decode_tokens(vq, steps[-1].tokens, 16), out.images)


def test_kv_cache_bytes_and_passes(c2i, vq):
    c = c2i.config
    out = generate(c2i, vq, torch.tensor([1, 2]), [ImageSettings(cfg=4.0)] * 2, decode=False)
    assert out.kv_bytes == 2 * c.n_layer * 4 * c.n_kv_head * c.max_seq_len * c.head_dim * 4
    assert out.forward_passes == c.block_size


def spec(name="m", **kw):
    base = dict(
        name=name,
        family="llamagen",
        weights=REFERENCE / "llamagen_t2i.pt",
        tokenizer=REFERENCE / "llamagen_vq.pt",
        n_head=2,
        image_size=256,
        defaults=SamplingDefaults(cfg=4.0, top_k=1000, top_p=1.0),
    )
    return ModelSpec(**{**base, **kw})


def test_text_prompts_through_the_runner(tmp_path):
    runner = load_runner(spec(text_encoder=make_tiny_t5(tmp_path)))
    assert (runner.conditioning, runner.image_size, runner.steps) == ("text", 256, 16)
    p = [ImageSettings(seed=s, cfg=4.0, top_k=100, top_p=1.0, temperature=1.0) for s in (0, 1)]
    both = runner.generate(["a handwritten seven", "the cat on the mat"], p)
    alone = runner.generate(["the cat on the mat"], p[1:])
    assert both.images.shape == (2, 3, 256, 256)
    torch.testing.assert_close(both.images[1], alone.images[0], atol=1e-5, rtol=0)
    other = runner.generate(["a digit"], p[1:])
    assert not torch.equal(other.images[0], alone.images[0])
    with pytest.raises(ValueError, match="text-conditional: give a text prompt"):
        runner.generate([3], p[:1])


def test_runner_configuration_errors(tmp_path):
    with pytest.raises(CheckpointError, match="needs 'text_encoder'"):
        load_runner(spec())
    with pytest.raises(CheckpointError, match="text encoder width 32 does not match"):
        load_runner(spec(text_encoder=make_tiny_t5(tmp_path, d_model=32)))
    c2i_spec = dataclasses.replace(spec(), weights=REFERENCE / "llamagen_c2i.pt")
    runner = load_runner(c2i_spec)
    assert (runner.conditioning, runner.num_classes) == ("class", 10)
    with pytest.raises(ValueError, match="class 10 is out of range 0..9"):
        runner.generate([10], [ImageSettings(0, 4.0, 1, 1.0, 1.0)])


def test_engine_rows_follow_each_familys_guidance_rule():
    """LlamaGen guides when cfg != 1, VAR when cfg != 0: the rows the service accounts KV bytes by
    are the rows the engine runs."""
    runner = load_runner(dataclasses.replace(spec(), weights=REFERENCE / "llamagen_c2i.pt"))

    def params(cfg):
        return [ImageSettings(s, cfg, 1, 1.0, 1.0) for s in range(4)]

    assert runner.engine_rows(params(1.0)) == 4 and runner.engine_rows(params(0.0)) == 8
    assert runner.engine_rows(params(4.0)) == 8
    plain, zero = runner.generate([1] * 4, params(1.0)), runner.generate([1] * 4, params(0.0))
    assert zero.kv_bytes == 2 * plain.kv_bytes  # cfg 0 runs the null rows, cfg 1 does not

    var_runner = load_runner(ModelSpec("v", "var", REFERENCE / "var_model.pth", REFERENCE / "var_vae.pth"))
    assert var_runner.engine_rows(params(0.0)) == 4 and var_runner.engine_rows(params(1.0)) == 8


def test_a_negative_prompt_is_the_guidance_rows_caption(tmp_path):
    """Greedy tokens with a negative caption are the argmax of uncond + cfg * (cond - uncond), the
    two branches teacher-forced on the prompt and on the negative caption, each with its own
    padding; the same request without one guides against the learned null caption instead."""
    runner = load_runner(spec(text_encoder=make_tiny_t5(tmp_path)))
    prompt, negative, cfg = "the cat on the mat with a hat", "a dog", 4.0
    greedy = ImageSettings(top_k=1, cfg=cfg, negative_prompt=negative)
    tokens = runner.generate([prompt], [greedy]).tokens  # (1, 256)
    plain = runner.generate([prompt], [dataclasses.replace(greedy, negative_prompt=None)]).tokens
    assert not torch.equal(tokens, plain)

    (cond, cond_mask), (neg, neg_mask) = (runner.text_encoder.encode([t]) for t in (prompt, negative))
    assert cond_mask.sum() != neg_mask.sum()  # the two captions are padded differently
    with torch.inference_mode():
        logits_cond = runner.model(tokens[:, :-1], cond, cond_mask)
        logits_uncond = runner.model(tokens[:, :-1], neg, neg_mask)
    guided = logits_uncond + cfg * (logits_cond - logits_uncond)
    assert torch.equal(guided.argmax(-1), tokens)


def test_negative_prompts_are_per_image_and_checked(tmp_path):
    runner = load_runner(spec(text_encoder=make_tiny_t5(tmp_path)))
    base = ImageSettings(seed=3, top_k=100, cfg=4.0)
    settings = [
        dataclasses.replace(base, negative_prompt="a dog"),
        base,
        dataclasses.replace(base, negative_prompt="blurry"),
        dataclasses.replace(base, cfg=1.0),
    ]
    batch = runner.generate(["a cat"] * 4, settings).tokens
    for i, s in enumerate(settings):
        assert torch.equal(runner.generate(["a cat"], [s]).tokens[0], batch[i]), i
    with pytest.raises(ValueError, match="needs guidance"):
        runner.generate(["a cat"], [dataclasses.replace(base, cfg=1.0, negative_prompt="a dog")])
    with pytest.raises(ValueError, match="empty"):
        runner.generate(["a cat"], [dataclasses.replace(base, negative_prompt="  ")])
    c2i = load_runner(dataclasses.replace(spec(), weights=REFERENCE / "llamagen_c2i.pt"))
    with pytest.raises(ValueError, match="class-conditional: negative_prompt needs a text model"):
        c2i.generate([1], [dataclasses.replace(base, negative_prompt="a dog")])
