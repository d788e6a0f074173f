"""Calibration: the recording store changes nothing and conserves mass; the derivation rules on
made-up masses; `varserve calibrate` writes a profile that the config picks up."""

import pytest
import torch

from models.config import DEFAULT_CONFIG, ConfigError, load_config
from models.kv import calibrate as cal
from models.kv.profile import KVProfile
from models.settings import ImageSettings
from models.var.generate import generate
from service.cli import main
from tests.conftest import one_bundled_model

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SIZES = torch.tensor([pn * pn for pn in PATCH_NUMS], dtype=torch.float64)


@pytest.fixture(scope="module")
def var_shapes():
    from models.var.loading import load_var

    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes")
    return spec, *load_var(spec.weights, spec.tokenizer)


def test_recording_store_gives_the_dense_tokens_and_conserves_mass(var_shapes):
    _, var, vae = var_shapes
    c = var.cfg
    settings = [ImageSettings(seed=s, cfg=2.0, top_k=20) for s in (3, 4)]
    stores = []

    def record(dense):
        stores.append(cal.RecordingScaleStore(dense, c.patch_nums, c.depth, c.num_heads))
        return stores[-1]

    plain = generate(var, vae, [1, 6], settings, decode=False)
    recorded = generate(var, vae, [1, 6], settings, decode=False, wrap_store=record)
    for a, b in zip(plain.tokens, recorded.tokens, strict=True):
        assert torch.equal(a, b)
    assert recorded.kv_bytes == plain.kv_bytes and recorded.kv_bytes_working == plain.kv_bytes_working

    (store,) = stores
    assert (store.rows == 4).all()  # 2 images x (conditional + guidance row), every layer and scale
    # softmax rows sum to 1: per (layer, head, query scale), queries x rows in all
    expected = (SIZES * 4).expand(c.depth, c.num_heads, -1)
    torch.testing.assert_close(store.mass.sum(-1), expected, rtol=1e-5, atol=0)
    assert (store.mass.triu(1) == 0).all()  # no query reads a later scale


def synthetic(pattern: str) -> torch.Tensor:
    """(S, S) per-query mass of one head: 'sink+current' (all on scale 0 and the query's own scale),
    'even' (uniform over keys), 'scales' (uniform over scales), 'current' (own scale only)."""
    S = len(PATCH_NUMS)
    m = torch.zeros(S, S, dtype=torch.float64)
    for k in range(S):
        if pattern == "sink+current":
            m[k, 0] = m[k, k] = 0.5
        elif pattern == "even":
            m[k, : k + 1] = SIZES[: k + 1] / SIZES[: k + 1].sum()
        elif pattern == "scales":
            m[k, : k + 1] = 1 / (k + 1)
        elif pattern == "current":
            m[k, k] = 1.0
    return m * SIZES[:, None] * 2  # as recorded: per-query mass x queries x 2 rows


def test_head_on_the_first_and_current_scales_is_structural_even_attention_contextual():
    mass = torch.stack([synthetic(p) for p in ("sink+current", "even", "scales", "current")])[None]
    assert cal.head_classes(mass, PATCH_NUMS) == [["structural", "contextual", "contextual", "structural"]]
    excess = cal.structural_excess(mass, PATCH_NUMS)[0]
    torch.testing.assert_close(excess[[0, 1, 3]], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_layers_on_the_current_map_are_refiners_spread_ones_drafters():
    heads = lambda p: torch.stack([synthetic(p)] * 2)  # noqa: E731
    mass = torch.stack([heads("current"), heads("even"), heads("sink+current")])  # 3 layers
    roles = cal.layer_roles(mass, PATCH_NUMS)
    assert roles[:3] == [["drafter"] * 3] * 3  # no history past the sinks yet: the default
    assert all(row == ["refiner", "drafter", "refiner"] for row in roles[3:])
    torch.testing.assert_close(cal.history_ratio(mass, PATCH_NUMS)[3:, 1], torch.ones(7, dtype=torch.float64))


def test_segment_scores_are_the_mean_over_later_scales_of_one_querys_mass():
    mass = synthetic("scales")[None, None]
    rows = torch.full((1, len(PATCH_NUMS)), 2)
    score = cal.segment_scores(mass, rows, PATCH_NUMS)[0, 0]
    S = len(PATCH_NUMS)
    expected = [sum(1 / (k + 1) for k in range(s + 1, S)) / (S - 1 - s) for s in range(S - 1)] + [0.0]
    torch.testing.assert_close(score, torch.tensor(expected, dtype=torch.float64))


def bundled_config(tmp_path, name="vs", extra=""):
    return one_bundled_model(tmp_path, "var-shapes", name, extra)


def test_cli_writes_a_profile_that_loads_and_that_the_config_picks_up(tmp_path, capsys):
    config = bundled_config(tmp_path)
    assert load_config(config)[0].kv_profile is None
    assert main(["calibrate", "--config", str(config), "--model", "vs", "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "vs.kvprofile.json"
    assert out.splitlines()[-1] == str(path)
    assert "structural" in out and "drafters" in out
    profile = KVProfile.load(path)
    assert profile.matches(PATCH_NUMS, 4, 4)
    assert profile.source["images"] == 2 and profile.source["model"] == "vs"
    assert load_config(config)[0].kv_profile == path.resolve()

    # an explicit kv_profile, relative to the config; named and missing, or malformed: ConfigError
    (tmp_path / "other").mkdir()
    named = bundled_config(tmp_path / "other", "x", 'kv_profile = "../vs.kvprofile.json"\n')
    assert load_config(named)[0].kv_profile == path.resolve()
    capsys.readouterr()
    assert main(["calibrate", "--config", str(named), "--model", "x", "--prompts", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(path.resolve())  # the file the config names
    assert KVProfile.load(path).source["images"] == 1
    missing = bundled_config(tmp_path / "other", "x", 'kv_profile = "none.json"\n')
    with pytest.raises(ConfigError, match="kv_profile 'none.json': no such file"):
        load_config(missing)
    path.write_text('{"patch_nums": [1, 2]}')
    with pytest.raises(ConfigError, match="vs.kvprofile.json: not a KV profile"):
        load_config(config)


def test_the_bundled_profile_is_found_and_fits_its_model():
    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes")
    assert spec.kv_profile == DEFAULT_CONFIG.parent / "var-shapes.kvprofile.json"
    assert KVProfile.load(spec.kv_profile).matches(PATCH_NUMS, 4, 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "--model 'nope' is not in the config"),
        (["--model", "var-shapes", "--prompts", "0"], "argument --prompts: 0 is outside [1, 256]"),
    ],
)
def test_cli_errors_exit_2_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["calibrate", "--out", str(tmp_path / "p.json"), *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
