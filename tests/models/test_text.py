"""The text-encoder interface: a local T5 directory, left padding as the official t2i sampler."""

import pytest
import torch

from models.text import T5TextEncoder, TextEncoderError, left_pad

WORDS = ["a", "handwritten", "seven", "cat", "on", "the", "mat", "digit", "number"]


def make_tiny_t5(path, d_model=64):
    """A randomly initialised 2-layer T5 encoder and a word-level tokenizer, saved as a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    T5EncoderModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


def test_left_pad_moves_words_to_the_end_and_zeroes_padding():
    emb = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1) + 1
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out, out_mask = left_pad(emb, mask)
    assert out[0, :, 0].tolist() == [0, 0, 1, 2]
    assert out_mask[0].tolist() == [False, False, True, True]
    assert torch.equal(out[1], emb[1]) and out_mask[1].all()


def test_t5_encoder_shapes_mask_and_batch_independence(tiny_t5):
    enc = T5TextEncoder(tiny_t5, max_tokens=12)
    assert enc.dim == 64
    emb, mask = enc.encode(["a handwritten seven", "the cat on the mat"])
    assert emb.shape == (2, 12, 64) and mask.shape == (2, 12)
    assert mask.sum(1).tolist() == [4, 6]  # words + </s>, at the end
    assert not mask[0, :8].any() and mask[0, 8:].all()
    assert (emb[0, :8] == 0).all()
    alone, _ = enc.encode(["a handwritten seven"])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-5, rtol=0)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="no such text-encoder directory"):
        T5TextEncoder(tmp_path / "flan-t5-xl")
    with pytest.raises(TextEncoderError, match="cannot load a T5 encoder"):
        T5TextEncoder(tmp_path)


def test_transformers_importing_hub_kernels_as_ours_is_a_clear_error(tiny_t5, monkeypatch):
    # transformers >= 5.25 imports Hugging Face's `kernels` by the import name of our kernels/
    # package; what that import raises must name the clash and the way out, not a bare ImportError
    import transformers

    def clash(*args, **kwargs):
        raise ImportError(
            "cannot import name 'CUDAProperties' from 'kernels' (/work/main/kernels/__init__.py)"
        )

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", clash)
    with pytest.raises(TextEncoderError, match=r"Hugging Face's `kernels`.*transformers<5.25"):
        T5TextEncoder(tiny_t5)

    def other(*args, **kwargs):
        raise ImportError("No module named 'sentencepiece'")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", other)
    with pytest.raises(ImportError, match="sentencepiece"):
        T5TextEncoder(tiny_t5)
