"""The half-precision paths a GPU takes (bfloat16 weights, activations and caches: the PyTorch
forms of what runs in C on CPU in float32), run end to end on CPU with the fixture models: a
next-scale image under a compressing, merging policy and a next-token image under speculative
decoding and in a running batch. Their caches hold half the bytes of float32's."""

import dataclasses

import pytest
import torch

from models.config import load_config
from models.runner import load_runner
from models.settings import settings_for
from tests.conftest import REPO


def runners(config: str):
    spec = load_config(REPO / "configs" / config)[0]
    half = dataclasses.replace(spec, dtype=torch.bfloat16, device="cpu")
    return load_runner(dataclasses.replace(spec, device="cpu")), load_runner(half)


@pytest.mark.parametrize("policy, merge", [("full", False), ("snapkv", True), ("heatkv", False)])
def test_a_next_scale_image_in_bfloat16_under_each_kind_of_store(policy, merge):
    fp32, bf16 = runners("fixtures.toml")
    settings = settings_for(fp32.spec.defaults, 3, 2, kv_policy=policy, kv_budget=0.25, kv_merge=merge)
    a, b = fp32.generate([1, 2], settings), bf16.generate([1, 2], settings)
    assert b.images.shape == a.images.shape and torch.isfinite(b.images).all()
    assert b.images.dtype == torch.float32 and 0 <= b.images.min() and b.images.max() <= 1
    assert b.kv_bytes_full * 2 == a.kv_bytes_full
    # K and V in the model's dtype; merging adds a float32 log count per slot in both
    D, count = fp32.model.cfg.head_dim, 4 if merge else 0
    assert b.kv_bytes * (2 * D * 4 + count) == a.kv_bytes * (2 * D * 2 + count)


@pytest.mark.parametrize("method", ["none", "scd", "gsd"])
def test_a_next_token_image_in_bfloat16_alone_and_in_a_running_batch(method):
    fp32, bf16 = runners("fixtures-llamagen.toml")
    settings = settings_for(fp32.spec.defaults, 5, 1, speculative={"method": method, "window": 8})
    assert settings[0].speculative.method == method
    a, b = fp32.generate([4], settings), bf16.generate([4], settings)
    assert b.images.shape == a.images.shape and torch.isfinite(b.images).all()
    assert b.kv_bytes * 2 == a.kv_bytes
    running = bf16.open_batch(None, 2)
    running.add([4], settings, ["image"])
    while not (finished := running.take_finished()):
        running.step()
    (image,) = finished
    assert image.tokens.shape == (bf16.image_tokens,) and running.blocks_free == running.blocks_total


def test_a_speculative_image_beside_a_plain_one_in_bfloat16():
    """Unequal windows in one pass run ragged (only the real tokens through the layers) on the
    layer-by-layer path a GPU takes: both images finish with tokens in the vocabulary, the
    speculative one in fewer passes, and every block comes back."""
    _, bf16 = runners("fixtures-llamagen.toml")
    plain = settings_for(bf16.spec.defaults, 6, 1)
    spec = settings_for(bf16.spec.defaults, 7, 1, speculative={"method": "scd", "window": 8})
    running = bf16.open_batch(None, 2)
    running.add([4, 5], plain + spec, ["plain", "scd"])
    done = {}
    while len(done) < 2:
        running.step()
        done.update({f.tag: f for f in running.take_finished()})
    vocab = bf16.model.config.vocab_size
    for f in done.values():
        assert f.tokens.shape == (bf16.image_tokens,) and 0 <= f.tokens.min() and f.tokens.max() < vocab
    assert done["scd"].forward_passes < done["plain"].forward_passes == bf16.image_tokens
    assert running.blocks_free == running.blocks_total
