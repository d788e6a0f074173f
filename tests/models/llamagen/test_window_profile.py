"""`varserve calibrate` on a next-token model: the window profile it writes, the config that finds
it, and `auto` windows that start from it instead of calibrating on their first image."""

import json
from dataclasses import replace

import pytest
import torch

from models.config import DEFAULT_CONFIG, ConfigError, load_config
from models.llamagen.generate import generate
from models.llamagen.runner import LlamaGenRunner
from models.llamagen.speculative import CALIBRATION, WINDOWS, AutoWindow
from models.llamagen.window_profile import WindowProfile
from models.settings import settings_for
from service.cli import main
from tests.conftest import one_bundled_model


def c2i_config(tmp_path, name="lg", extra=""):
    defaults = "[model.defaults]\ncfg = 2.0\ntop_k = 20\ntop_p = 0.0\n"
    return one_bundled_model(tmp_path, "llamagen-shapes", name, extra + defaults)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One calibration image per method (seed 0, class 0), written by the CLI."""
    tmp_path = tmp_path_factory.mktemp("windows")
    config = c2i_config(tmp_path)
    assert load_config(config)[0].window_profile is None
    assert main(["calibrate", "--config", str(config), "--model", "lg", "--prompts", "1"]) == 0
    return config, tmp_path / "lg.windows.json"


def test_cli_writes_a_profile_that_the_config_and_the_runner_pick_up(calibrated, capsys, monkeypatch):
    config, path = calibrated
    profile = WindowProfile.load(path)
    assert profile.image_tokens == 256 and set(profile.tokens_per_pass) == {"sjd", "scd", "gsd"}
    for per_window in profile.tokens_per_pass.values():
        assert sorted(per_window) == list(CALIBRATION)
        assert all(1 < t <= L for L, t in per_window.items())  # every window commits more than one
    assert profile.source["images"] == 1 and profile.source["model"] == "lg"
    assert sorted(profile.overhead_s) == list(WINDOWS)  # every width's overhead, plain decoding's too
    spec = load_config(config)[0]
    assert spec.window_profile == path.resolve()

    runner = LlamaGenRunner(spec)
    assert all(runner.auto.calibrated(m) for m in ("sjd", "scd", "gsd"))

    def no_calibration(*args):
        raise AssertionError("an auto image calibrated although the model has a profile")

    monkeypatch.setattr(AutoWindow, "calibrate", no_calibration)
    (settings,) = settings_for(spec.defaults, 3, 1, speculative={"method": "scd", "window": "auto"})
    out = runner.generate([2], [settings])
    assert out.images.shape == (1, 3, 64, 64)


def test_the_profile_holds_what_the_engine_calibrates_on_the_same_image(calibrated):
    """The CLI's first image is the one an auto request with seed 0 and class 0 calibrates on at
    run time: the same tokens per pass, window for window."""
    config, path = calibrated
    spec = load_config(config)[0]
    runner = LlamaGenRunner(replace(spec, window_profile=None))
    (settings,) = settings_for(spec.defaults, 0, 1, speculative={"method": "gsd", "window": "auto"})
    auto = AutoWindow(runner.model, repeats=1)
    generate(runner.model, None, torch.tensor([0]), [settings], decode=False, auto=auto)
    from_file = WindowProfile.load(path).tokens_per_pass["gsd"]
    assert {L: round(auto.tokens["gsd", L], 4) for L in CALIBRATION} == from_file


def test_bad_profiles_are_config_errors_naming_the_file(calibrated, tmp_path):
    config, path = calibrated
    doc = json.loads(path.read_text())
    (tmp_path / "other").mkdir()
    named = c2i_config(tmp_path / "other", extra=f'window_profile = "{path}"\n')
    assert load_config(named)[0].window_profile == path.resolve()
    with pytest.raises(ConfigError, match="window_profile 'none.json': no such file"):
        load_config(c2i_config(tmp_path / "other", extra='window_profile = "none.json"\n'))
    bad = tmp_path / "bad.json"
    for broken in (
        {"image_tokens": 256},
        {**doc, "tokens_per_pass": {"scd": {"4": 5.0}}},  # more tokens than the window
        {**doc, "tokens_per_pass": {}},
        {**doc, "overhead_s": {**doc["overhead_s"], "2": float("nan")}},
    ):
        bad.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match="bad.json: not a window profile"):
            load_config(c2i_config(tmp_path / "other", extra=f'window_profile = "{bad}"\n'))
    for broken, message in (
        ({**doc, "image_tokens": 576}, "a window profile of a 576-token model, not 256"),  # another model's
        ({**doc, "tokens_per_pass": {"sjd": {"2": 1.5}}}, r"tokens_per_pass.sjd covers windows \[2\]"),
    ):
        bad.write_text(json.dumps(broken))
        spec = load_config(c2i_config(tmp_path / "other", extra=f'window_profile = "{bad}"\n'))[0]
        with pytest.raises(ValueError, match=f"bad.json: {message}"):
            LlamaGenRunner(spec)
    var = next(s for s in load_config(DEFAULT_CONFIG) if s.name == "var-shapes")
    (tmp_path / "v").mkdir()
    var_config = tmp_path / "v" / "models.toml"
    var_config.write_text(
        f'[[model]]\nname = "v"\nfamily = "var"\nweights = "{var.weights}"\ntokenizer = "{var.tokenizer}"\n'
        f'window_profile = "{path}"\n'
    )
    with pytest.raises(ConfigError, match="'window_profile' is for next-token"):
        load_config(var_config)


@pytest.mark.parametrize("name", ["llamagen-shapes", "llamagen-shapes-t2i"])
def test_the_bundled_profiles_are_found_and_fit_their_models(name):
    spec = next(s for s in load_config(DEFAULT_CONFIG) if s.name == name)
    assert spec.window_profile == DEFAULT_CONFIG.parent / f"{name}.windows.json"
    profile = WindowProfile.load(spec.window_profile)
    assert profile.image_tokens == 256 and set(profile.tokens_per_pass) == {"sjd", "scd", "gsd"}
    assert all(sorted(w) == list(CALIBRATION) for w in profile.tokens_per_pass.values())
    assert sorted(profile.overhead_s) == list(WINDOWS)  # plain decoding's window 1 included
    d = spec.defaults
    assert profile.source["sampling"] == {
        "cfg": d.cfg,
        "top_k": d.top_k,
        "top_p": d.top_p,
        "temperature": d.temperature,
    }
