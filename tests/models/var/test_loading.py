"""Loading published VAR / VQ-VAE layouts: architecture inferred from tensors, errors that name
the file and the key."""

import json

import pytest
import torch

from models.loading import CheckpointError, meta_state_dict, read_state_dict
from models.var.loading import build_var, build_vqvae, load_var
from tests.conftest import FIXTURES, REFERENCE

LAYOUTS = json.loads((FIXTURES / "published_layouts.json").read_text())
PUBLISHED_VAR = {"var_d16.pth": (16, 1024, 16), "var_d20.pth": (20, 1280, 20), "var_d24.pth": (24, 1536, 24),
                 "var_d30.pth": (30, 1920, 30)}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_VAR))
def test_published_var_layout_loads_on_meta(name):
    model = build_var(meta_state_dict(LAYOUTS[name]), name)
    depth, width, heads = PUBLISHED_VAR[name]
    cfg = model.cfg
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (depth, width, heads)
    assert (cfg.num_classes, cfg.vocab_size, cfg.vae_dim, cfg.seq_len) == (1000, 4096, 32, 680)
    assert cfg.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert all(p.is_meta for p in model.parameters())


def test_published_vqvae_layout_loads_on_meta():
    vae = build_vqvae(meta_state_dict(LAYOUTS["vae_ch160v4096z32.pth"]), "vae_ch160v4096z32.pth", (1, 2, 16))
    assert (vae.cfg.ch, vae.cfg.vocab_size, vae.cfg.vae_dim, vae.cfg.num_phi) == (160, 4096, 32, 4)
    assert vae.cfg.ch_mult == (1, 1, 2, 2, 4)
    assert all(p.is_meta for p in vae.parameters())


def test_var_d16_parameter_count():
    n = sum(p.numel() for p in build_var(meta_state_dict(LAYOUTS["var_d16.pth"]), "d16").parameters())
    assert 300e6 < n < 320e6  # the paper's VAR-d16 has 310M parameters


def test_safetensors_loads_the_same_model(tmp_path, var_pair):
    from safetensors.torch import save_file

    var, _ = var_pair
    state = {k: v.contiguous() for k, v in read_state_dict(REFERENCE / "var_model.pth").items()}
    save_file(state, tmp_path / "var.safetensors")
    var2, _ = load_var(tmp_path / "var.safetensors", REFERENCE / "var_vae.pth")
    for (k, a), b in zip(var.state_dict().items(), var2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_garbage_file_names_the_file(tmp_path):
    bad = tmp_path / "var_d16.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="var_d16.pth: not a readable checkpoint"):
        read_state_dict(bad)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth: no such checkpoint file"):
        read_state_dict(tmp_path / "nothere.pth")


def test_vae_given_as_transformer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"var_vae.pth: missing key 'word_embed.weight'"):
        load_var(REFERENCE / "var_vae.pth", REFERENCE / "var_vae.pth")


def edited_checkpoint(tmp_path, edit) -> str:
    state = dict(torch.load(REFERENCE / "var_model.pth", weights_only=True))
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


def test_missing_key_is_named(tmp_path):
    path = edited_checkpoint(tmp_path, lambda s: s.pop("blocks.2.ffn.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"edited.pth: missing key 'blocks.2.ffn.fc2.bias'"):
        load_var(path, REFERENCE / "var_vae.pth")


def test_unexpected_key_is_named(tmp_path):
    path = edited_checkpoint(tmp_path, lambda s: s.update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"edited.pth: unexpected key 'extra.weight'"):
        load_var(path, REFERENCE / "var_vae.pth")


def test_shape_mismatch_is_named(tmp_path):
    path = edited_checkpoint(tmp_path, lambda s: s.update({"blocks.1.attn.proj.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"edited.pth: key 'blocks.1.attn.proj.bias' has shape \(7,\)"):
        load_var(path, REFERENCE / "var_vae.pth")
