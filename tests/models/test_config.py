"""The TOML model config: paths relative to the file, defaults, errors that name the field."""

import pytest
import torch

from models.config import ConfigError, load_config
from models.settings import Speculative, settings_for

LLAMAGEN = 'name = "a"\nfamily = "llamagen"\nweights = "w"\ntokenizer = "t"\nn_head = 2\nimage_size = 256\n'


def write(tmp_path, text):
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_paths_are_relative_to_the_config_and_defaults_merge(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(
        tmp_path,
        """
[[model]]
name = "a"
family = "var"
weights = "sub/w.pth"
tokenizer = "/abs/vae.pth"
device = "cpu"
[model.defaults]
cfg = 2.5
""",
    )
    (spec,) = load_config(path)
    assert spec.weights == (tmp_path / "sub" / "w.pth").resolve()
    assert str(spec.tokenizer) == "/abs/vae.pth"
    assert (spec.device, spec.dtype) == ("cpu", torch.float32)
    assert (spec.defaults.cfg, spec.defaults.top_k, spec.defaults.top_p) == (2.5, 900, 0.95)


def test_speculative_defaults_are_read_for_next_token_models(tmp_path):
    (spec,) = load_config(
        write(tmp_path, "[[model]]\n" + LLAMAGEN + 'speculative = {method = "scd", window = 8}')
    )
    assert spec.defaults.speculative == Speculative("scd", 8)
    assert settings_for(spec.defaults, 0, 1)[0].speculative == Speculative("scd", 8)
    assert settings_for(spec.defaults, 0, 1, speculative={"window": "auto"})[0].speculative == Speculative(
        "scd", "auto"
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ('name = "a"\nfamily = "var"\nweights = "w"', "missing or empty 'tokenizer'"),
        (
            'name = "a"\nfamily = "diffusion"\nweights = "w"\ntokenizer = "t"',
            "family 'diffusion' is not one of",
        ),
        ('name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nwieghts = 1', "unknown key 'wieghts'"),
        ('name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\ndtype = "int8"', "dtype 'int8'"),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\ndevice = "cuda"',
            "CUDA is not available",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\ndefaults = {top_p = 3}',
            "out of range",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\ndefaults = {topk = 3}',
            "'defaults.topk'",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nkv = {kv_policy = "lru"}',
            "kv.kv_policy 'lru' is not one of full, window, snapkv, hack, scalekv, heatkv, valuekv",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nkv = {kv_budget = 0}',
            r"kv.kv_budget 0 must be a number in \(0, 1\]",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nkv = {kv_budget = "1"}',
            "kv.kv_budget '1' must be a number",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nkv = {kv_merge = "yes"}',
            "kv.kv_merge 'yes' must be true or false",
        ),
        (
            'name = "a"\nfamily = "llamagen"\nweights = "w"\ntokenizer = "t"\nimage_size = 256\nn_head = 4\n'
            "kv = {kv_merge = true}",
            "kv.kv_merge: next-token models keep their full KV cache",
        ),
        ('name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nkv = {policy = "hack"}', "'kv.policy'"),
        ('name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nkv = 3', "'kv' must be a table"),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\ndefaults = {kv_policy = "hack"}',
            "'defaults.kv_policy'",
        ),
        (
            'name = "a"\nfamily = "llamagen"\nweights = "w"\ntokenizer = "t"\nimage_size = 256\nn_head = 4\n'
            'kv = {kv_policy = "snapkv"}',
            "next-token models keep their full KV cache",
        ),
        (
            'name = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\nspeculative = {method = "sjd"}',
            "unknown key 'speculative'",
        ),
        (LLAMAGEN + 'speculative = {method = "fast"}', "speculative.method 'fast'"),
        (LLAMAGEN + "speculative = {window = 0}", "speculative.window must be 1..32"),
        (LLAMAGEN + "speculative = {windw = 8}", "unknown key 'speculative.windw'"),
        (LLAMAGEN + "speculative = {distance = 0}", "speculative.distance must be a number > 0"),
    ],
)
def test_bad_model_tables_name_the_field(tmp_path, body, message):
    if "cuda" in body and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, "[[model]]\n" + body))
    assert "model #1" in str(err.value)


def test_kv_defaults_come_from_the_model_kv_table(tmp_path):
    head = '[[model]]\nname = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\ndevice = "cpu"\n'
    (spec,) = load_config(write(tmp_path, head + '[model.kv]\nkv_policy = "hack"\nkv_budget = 0.25\n'))
    assert (spec.defaults.kv_policy, spec.defaults.kv_budget, spec.defaults.cfg) == ("hack", 0.25, 4.0)
    (spec,) = load_config(write(tmp_path, head + "[model.kv]\nkv_budget = 1\n"))
    assert (spec.defaults.kv_policy, spec.defaults.kv_budget) == ("full", 1.0)
    (spec,) = load_config(write(tmp_path, head))
    assert (spec.defaults.kv_policy, spec.defaults.kv_budget) == ("full", 1.0)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[[model]\n"))
    with pytest.raises(ConfigError, match=r"no \[\[model\]\] tables"):
        load_config(write(tmp_path, "title = 'x'\n"))
    table = '[[model]]\nname = "a"\nfamily = "var"\nweights = "w"\ntokenizer = "t"\n'
    with pytest.raises(ConfigError, match="model name 'a' appears twice"):
        load_config(write(tmp_path, table + table))
