"""The bundled default models (models/default): they load through the published-layout loaders,
generate for every class and for captions, and draw digits a classifier of real digits recognises."""

import pytest
import torch

from bench.quality import classify, conditions_for, generate, train_classifier
from models.config import DEFAULT_CONFIG, class_index, load_config
from models.runner import ModelRunner

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def specs():
    return {s.name: s for s in load_config(DEFAULT_CONFIG)}


@pytest.fixture(scope="module")
def runners(specs):
    return {name: ModelRunner(spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def classifier():
    pytest.importorskip("sklearn")
    return train_classifier()[0]


def test_default_config_lists_both_families_and_text(specs):
    assert {s.family for s in specs.values()} == {"var", "llamagen"}
    t2i = [s for s in specs.values() if s.text_encoder_kind == "minilm"]
    assert len(t2i) == 1 and t2i[0].text_encoder is not None and t2i[0].text_encoder.is_dir()
    for spec in specs.values():
        assert spec.weights.is_file() and spec.tokenizer.is_file()
        if spec.class_names is not None:
            assert spec.class_names == DIGITS
            assert class_index(spec, "seven") == 7 and class_index(spec, "Seven") == 7
            assert class_index(spec, "3") == 3 and class_index(spec, 4) == 4
            with pytest.raises(ValueError, match="unknown class 'eleven'"):
                class_index(spec, "eleven")


def test_checkpoints_load_through_the_published_layout_loaders(specs):
    from models.llamagen.loading import load_gpt, load_vq
    from models.var.loading import load_var

    for spec in specs.values():
        if spec.family == "var":
            model, vae = load_var(spec.weights, spec.tokenizer)
            assert model.cfg.patch_nums == (1, 2, 3, 4) and model.cfg.image_size == 64
            assert model.cfg.num_classes == 10 and vae.cfg.vocab_size == model.cfg.vocab_size
        else:
            gpt = load_gpt(spec.weights, n_head=spec.n_head, image_size=spec.image_size)
            vq = load_vq(spec.tokenizer)
            assert gpt.config.grid_size == 4 and vq.config.codebook_size == gpt.config.vocab_size
            if gpt.config.model_type == "t2i":
                assert (gpt.config.cls_token_num, gpt.config.caption_dim) == (16, 384)
            else:
                assert gpt.config.num_classes == 10


def test_every_model_generates_every_class_or_caption(runners):
    for runner in runners.values():
        conditions, _ = conditions_for(runner, 1)
        images = generate(runner, conditions, seed=0)
        assert images.shape == (10, 3, 64, 64)
        assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1


@pytest.mark.parametrize("name", ["var-digits", "llamagen-digits", "llamagen-digits-t2i"])
def test_classifier_recognises_generated_digits(runners, classifier, name):
    runner = runners[name]
    conditions, digits = conditions_for(runner, 10)  # 100 images, seeds 1000..1099
    predicted = classify(classifier, generate(runner, conditions, seed=1000))
    accuracy = (torch.tensor(predicted) == torch.tensor(digits)).float().mean().item()
    assert accuracy >= 0.8, f"{name}: {accuracy:.0%} of 100 generated digits recognised"


@pytest.mark.parametrize(
    "value, message",
    [("[]", "non-empty list"), ('["a", 3]', "non-empty list"), ('["a", "a"]', "'a' appears twice")],
)
def test_bad_class_names_are_config_errors(tmp_path, value, message):
    from models.config import ConfigError

    path = tmp_path / "models.toml"
    path.write_text(
        f'[[model]]\nname = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nclass_names = {value}\n'
    )
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_minilm_encoder_left_pads_like_t5():
    from models.text import MiniLMTextEncoder

    enc = MiniLMTextEncoder(max_tokens=16)
    assert enc.dim == 384 and enc.max_tokens == 16
    emb, mask = enc.encode(["a handwritten seven", "number 7"])
    assert emb.shape == (2, 16, 384) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [6, 4]  # [CLS] a hand ##written seven [SEP]; [CLS] number 7 [SEP]
    assert mask[0, -6:].all() and not mask[0, :-6].any() and (emb[0, :-6] == 0).all()
    alone, _ = enc.encode(["a handwritten seven"])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-5, rtol=0)
