"""VARRunner.kv_bytes_per_image, the bytes the server admits images by, is what the batch's store
allocates: the slab (kv_bytes) for a compressing policy, the dense store's whole buffer
(kv_bytes_working) for full, summed over a batch's images."""

import pytest

from models.config import DEFAULT_CONFIG, load_config
from models.kv.policies import KV_POLICIES
from models.runner import load_runner
from models.settings import ImageSettings


@pytest.fixture(scope="module")
def runner():
    return load_runner(next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes"))


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("name", KV_POLICIES)
@pytest.mark.parametrize("cfg", [2.0, 0.0])
def test_planned_bytes_are_the_store_the_batch_allocates(runner, name, cfg, merge):
    settings = [
        ImageSettings(seed=i, cfg=cfg, top_k=20, kv_policy=name, kv_budget=0.1, kv_merge=merge)
        for i in range(2)
    ]
    out = runner.generate([0, 5], settings)
    planned = sum(runner.kv_bytes_per_image(s) for s in settings)
    assert planned == (out.kv_bytes_working if name == "full" else out.kv_bytes)
    if name == "full":
        return
    # merging adds a 4-byte log count per slot beside K and V's 2 x 32 x 4 bytes
    extra = 1 + 4 / (2 * 32 * 4) if merge else 1
    assert planned <= 0.1 * out.kv_bytes_full * extra
    if extra > 1:
        plain = [ImageSettings(seed=i, cfg=cfg, kv_policy=name, kv_budget=0.1) for i in range(2)]
        assert planned == round(sum(runner.kv_bytes_per_image(s) for s in plain) * extra)


def test_guidance_doubles_an_image_and_full_ignores_its_budget(runner):
    one = runner.kv_bytes_per_image(ImageSettings(cfg=0.0, kv_policy="hack", kv_budget=0.25))
    assert runner.kv_bytes_per_image(ImageSettings(cfg=2.0, kv_policy="hack", kv_budget=0.25)) == 2 * one
    full = runner.kv_bytes_per_image(ImageSettings(cfg=2.0))
    assert runner.kv_bytes_per_image(ImageSettings(cfg=2.0, kv_budget=0.1)) == full


@pytest.mark.parametrize("name", ["snapkv", "heatkv"])
def test_merging_costs_nothing_where_the_budget_keeps_every_key(runner, name):
    settings = [
        ImageSettings(seed=i, cfg=2.0, kv_policy=name, kv_budget=1.0, kv_merge=True) for i in range(2)
    ]
    out = runner.generate([0, 5], settings)
    planned = sum(runner.kv_bytes_per_image(s) for s in settings)
    assert planned == out.kv_bytes == out.kv_bytes_full
