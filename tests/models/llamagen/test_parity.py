"""LlamaGen GPT and VQ-16 against outputs of the official code (see shared/fixtures/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.llamagen.generate import greedy_generate
from models.llamagen.loading import load_gpt, load_vq
from models.llamagen.model import GPT, GPTConfig
from models.loading import CheckpointError, meta_state_dict

FIXTURES = (Path(__file__).resolve().parents[3] / "../shared/fixtures").resolve()
REF = FIXTURES / "reference"
# The fixture GPTs are 2 heads over a 16 x 16 token grid (256 px); heads and grid are not in the files.
FIXTURE_GPT = dict(n_head=2, image_size=256)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The decode loops are hundreds of tiny ops: with the 2 cores shared by another process, OpenMP's
    spin-waiting makes them ~50x slower multi-threaded than on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF / "llamagen_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def gpts():
    return {mt: load_gpt(REF / f"llamagen_{mt}.pt", **FIXTURE_GPT) for mt in ("c2i", "t2i")}


@pytest.fixture(scope="module")
def vq():
    return load_vq(REF / "llamagen_vq.pt")


@pytest.fixture(scope="module")
def layouts():
    return json.loads((FIXTURES / "published_layouts.json").read_text())


# -- teacher-forced logits --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_teacher_forced_logits(gpts, ref, model_type):
    r = ref[model_type]
    with torch.no_grad():
        logits = gpts[model_type](r["idx"], r["cond"])  # (2, 256, 4096)
    assert logits.shape == (2, 256, 4096)
    torch.testing.assert_close(logits[..., :256], r["logits_head"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), r["logits_lse"], atol=1e-4, rtol=0)
    assert (logits.argmax(-1) == r["logits_argmax"]).float().mean() >= 0.999


# -- the KV-store seam ------------------------------------------------------------------------------


def cached_teacher_forced(model: GPT, cond, idx, cond_mask=None) -> torch.Tensor:
    """Feed idx (B, T) through prefill + decode_step -> logits (B, T + 1, vocab), like `forward`."""
    B = idx.shape[0]
    store, key_valid = model.new_kv_store(B), model.key_valid(cond_mask)
    out = [model.prefill(model.embed_cond(cond), store, key_valid)]
    for i in range(idx.shape[1]):
        pos = torch.full((B, 1), model.config.cls_token_num + i)
        out.append(model.decode_step(idx[:, i : i + 1], pos, store, key_valid)[:, 0])
    return torch.stack(out, dim=1)


def test_a_window_of_tokens_gives_the_logits_of_one_token_steps(gpts, ref):
    """decode_step over several new tokens per row (a verify window), rows at their own positions,
    gives each position the logits that one-token steps give."""
    model, r = gpts["c2i"], ref["c2i"]
    idx, C = r["idx"][:, :12], model.config.cls_token_num
    with torch.no_grad():
        steps = cached_teacher_forced(model, r["cond"], idx)  # (2, 13, V)
        store = model.new_kv_store(2)
        model.prefill(model.embed_cond(r["cond"]), store)
        first = model.decode_step(idx[:, :4], C + torch.arange(4).expand(2, 4), store)
        # then row 0 goes on at token 4 while row 1 re-feeds from token 2 (rewriting equal keys):
        # one call, each row at its own positions
        start = torch.tensor([[4], [2]])
        window = torch.stack([idx[0, 4:12], idx[1, 2:10]])
        second = model.decode_step(window, C + start + torch.arange(8), store)
    torch.testing.assert_close(first, steps[:, 1:5], atol=1e-4, rtol=0)
    torch.testing.assert_close(second[0], steps[0, 5:13], atol=1e-4, rtol=0)
    torch.testing.assert_close(second[1], steps[1, 3:11], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_cached_decode_matches_teacher_forced(gpts, ref, model_type):
    model, r = gpts[model_type], ref[model_type]
    with torch.no_grad():
        full = model(r["idx"], r["cond"])
        cached = cached_teacher_forced(model, r["cond"], r["idx"])
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_cached_decode_gqa_and_caption_mask():
    """Grouped KV heads and padded captions take the masked/GQA attention paths on both sides."""
    torch.manual_seed(0)
    cfg = GPTConfig(
        dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_hidden=128, vocab_size=64, block_size=16,
        model_type="t2i", cls_token_num=6, caption_dim=16,
    )  # fmt: skip
    model = GPT(cfg).eval()
    cond, idx = torch.randn(2, 6, 16), torch.randint(0, 64, (2, 15))
    cond_mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])  # left-padded caption
    store = model.new_kv_store(2)
    assert store.k[0].shape == (2, 2, 6 + 15, 16)
    assert store.nbytes == 2 * 2 * (2 * 2 * 21 * 16) * 4
    with torch.no_grad():
        full = model(idx, cond, cond_mask)
        cached = cached_teacher_forced(model, cond, idx, cond_mask)
        unmasked = model(idx, cond)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert not torch.allclose(full[0], unmasked[0], atol=1e-3)  # the mask does something...
    torch.testing.assert_close(full[1], unmasked[1], atol=1e-5, rtol=0)  # ...only where there is padding

    # and the loader finds the grouped KV heads from the wqkv shape
    loaded = load_gpt(model.state_dict(), n_head=4, image_size=4 * 16)
    assert (loaded.config.n_kv_head, loaded.config.cls_token_num, loaded.config.caption_dim) == (2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx, cond, cond_mask), full, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_greedy_cfg4_generation(gpts, ref, model_type):
    r = ref[model_type]
    tokens = greedy_generate(gpts[model_type], r["cond"], cfg_scale=4.0)
    assert (tokens == r["greedy_cfg4_tokens"].long()).float().mean() >= 0.99


# -- VQ tokenizer -----------------------------------------------------------------------------------


def test_vq_decode(vq, ref):
    with torch.no_grad():
        img = vq.decode_codes(ref["vq"]["codes"].long(), grid=16)
    torch.testing.assert_close(img, ref["vq"]["img"], atol=1e-4, rtol=0)


def test_vq_encode(vq, ref):
    with torch.no_grad():
        codes = vq.encode(ref["vq"]["input_img"])
    assert codes.shape == (2, 256)
    assert (codes == ref["vq"]["encoded_codes"]).float().mean() >= 0.99


# -- published layouts, on meta tensors -------------------------------------------------------------


def assert_meta(model):
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_layout_vq_ds16(layouts):
    vq = load_vq(meta_state_dict(layouts["vq_ds16_c2i.pt[model]"]))
    assert_meta(vq)
    c = vq.config
    assert (c.ch, c.z_channels, c.codebook_size, c.codebook_embed_dim) == (128, 256, 16384, 8)
    assert c.encoder_ch_mult == c.decoder_ch_mult == [1, 1, 2, 2, 4]
    assert (c.encoder_res_blocks, c.decoder_res_blocks, c.downsample) == (2, 3, 16)


@pytest.mark.parametrize(
    "name, arch, image_size, model_type, n_layer, dim, n_head, grid",
    [
        ("c2i_B_256.pt[model]", "GPT-B", 256, "c2i", 12, 768, 12, 16),
        ("c2i_XL_384.pt[model]", "GPT-XL", 384, "c2i", 36, 1280, 20, 24),
        ("t2i_XL_stage1_256.pt[model]", "GPT-XL", 256, "t2i", 36, 1280, 20, 16),
    ],
)
def test_layout_gpt(layouts, name, arch, image_size, model_type, n_layer, dim, n_head, grid):
    model = load_gpt(meta_state_dict(layouts[name]), arch=arch, image_size=image_size)
    assert_meta(model)
    c = model.config
    assert (c.model_type, c.n_layer, c.dim, c.n_head) == (model_type, n_layer, dim, n_head)
    assert c.n_kv_head == n_head
    assert (c.grid_size, c.block_size, c.vocab_size) == (grid, grid * grid, 16384)
    assert c.ffn_hidden == (2048 if dim == 768 else 3584)
    if model_type == "c2i":
        assert (c.num_classes, c.cls_token_num) == (1000, 1)
    else:
        assert (c.cls_token_num, c.caption_dim) == (120, 2048)


def test_layout_n_head_instead_of_arch(layouts):
    model = load_gpt(meta_state_dict(layouts["c2i_XL_384.pt[model]"]), n_head=20, image_size=384)
    assert (model.config.n_layer, model.config.grid_size) == (36, 24)


def test_layout_wrong_arch(layouts):
    with pytest.raises(CheckpointError, match="GPT-L"):
        load_gpt(meta_state_dict(layouts["c2i_XL_384.pt[model]"]), arch="GPT-L", image_size=384)


# -- bad checkpoints --------------------------------------------------------------------------------


def c2i_state() -> dict[str, torch.Tensor]:
    return torch.load(REF / "llamagen_c2i.pt", weights_only=True)["model"]


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.pt"
    data = (REF / "llamagen_c2i.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_gpt(path, **FIXTURE_GPT)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_vq(path)


def test_missing_key(tmp_path):
    state = c2i_state()
    del state["layers.1.feed_forward.w2.weight"]
    path = tmp_path / "missing.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*'layers\.1\.feed_forward\.w2\.weight'"):
        load_gpt(path, **FIXTURE_GPT)


def test_wrong_shape(tmp_path):
    state = c2i_state()
    state["layers.0.attention.wo.weight"] = torch.zeros(128, 64)
    path = tmp_path / "wrong_shape.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"wrong_shape\.pt.*'layers\.0\.attention\.wo\.weight'"):
        load_gpt(path, **FIXTURE_GPT)


def test_unexpected_key(tmp_path):
    state = c2i_state()
    state["layers.0.attention.bias"] = torch.zeros(3)
    path = tmp_path / "unexpected.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"unexpected\.pt.*'layers\.0\.attention\.bias'"):
        load_gpt(path, **FIXTURE_GPT)


def test_wrong_model_file():
    with pytest.raises(CheckpointError, match=r"llamagen_vq\.pt.*'tok_embeddings\.weight'"):
        load_gpt(REF / "llamagen_vq.pt", **FIXTURE_GPT)
    with pytest.raises(CheckpointError, match=r"llamagen_c2i\.pt.*'encoder\.conv_in\.weight'"):
        load_vq(REF / "llamagen_c2i.pt")


def test_training_only_keys_are_ignored(tmp_path):
    state = c2i_state()
    state["freqs_cis"] = torch.zeros(257, 32, 2)
    path = tmp_path / "with_freqs.pt"
    torch.save({"model": state}, path)
    model = load_gpt(path, **FIXTURE_GPT)
    assert "freqs_cis" not in model.state_dict()


def test_missing_arguments():
    with pytest.raises(ValueError, match="arch"):
        load_gpt(REF / "llamagen_c2i.pt", image_size=256)
    with pytest.raises(ValueError, match="image_size"):
        load_gpt(REF / "llamagen_c2i.pt", n_head=2)
