"""Server settings (flags over VARSERVE_* variables over defaults) and ImageNet class names."""

import argparse
import re
from pathlib import Path

import pytest

from models.conditions import resolve_condition
from models.config import ModelSpec
from service.settings import Settings, add_serve_arguments, settings_from


def parse(*argv: str, env: dict | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_flags_override_environment_override_defaults():
    s = parse("--config", "a.toml", "--max-batch-size", "8", env={"VARSERVE_MAX_BATCH_SIZE": "4"})
    assert (s.config, s.max_batch_size, s.port, s.max_wait_ms) == (Path("a.toml"), 8, 8000, 10.0)
    s = parse(env={"VARSERVE_CONFIG": "b.toml", "VARSERVE_MAX_WAIT_MS": "2.5", "VARSERVE_HOST": "0.0.0.0"})
    assert (s.config, s.max_wait_ms, s.host) == (Path("b.toml"), 2.5, "0.0.0.0")
    assert parse("--config", "c", "--max-images", "32", "--max-batch-size", "8").max_n == 8


def test_config_defaults_to_the_bundled_models():
    from models.config import DEFAULT_CONFIG

    assert parse(env={}).config == DEFAULT_CONFIG and DEFAULT_CONFIG.is_file()


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (("--config", "c", "--port", "70000"), {}, "--port: 70000 is outside [0, 65535]"),
        (("--config", "c"), {"VARSERVE_TIMEOUT_S": "0"}, "VARSERVE_TIMEOUT_S: 0.0 is not > 0"),
        (("--config", "c", "--log-level", "loud"), {}, "--log-level: 'loud' is not one of"),
        (("--config", "c", "--log-format", "xml"), {}, "--log-format: 'xml' is not one of text, json"),
        (("--config", "c"), {"VARSERVE_LOG_FORMAT": "yaml"}, "VARSERVE_LOG_FORMAT: 'yaml' is not one of"),
    ],
)
def test_bad_settings_name_the_flag_or_variable(argv, env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(*argv, env=env)


def test_the_models_leave_a_cpu_to_the_http_side_unless_told(monkeypatch):
    monkeypatch.setattr("service.cpus.cgroup_cpu_quota", lambda *a: None)  # whatever this host's cgroup says
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert parse().model_threads == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert parse().model_threads == 1  # one CPU: it is shared
    assert parse("--threads", "2").model_threads == 2
    assert parse(env={"VARSERVE_THREADS": "4"}).model_threads == 4
    with pytest.raises(ValueError, match=re.escape("VARSERVE_THREADS: 0 is not > 0")):
        parse(env={"VARSERVE_THREADS": "0"})
    with pytest.raises(ValueError, match=re.escape("--threads: 'two' is not a valid int")):
        parse("--threads", "two")


def test_log_format_is_text_unless_json_is_asked_for():
    assert parse().log_format == "text"
    assert parse(env={"VARSERVE_LOG_FORMAT": "JSON"}).log_format == "json"
    assert parse("--log-format", "text", env={"VARSERVE_LOG_FORMAT": "json"}).log_format == "text"


def test_a_bad_log_format_is_a_command_line_error(monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("VARSERVE_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2
    assert "VARSERVE_LOG_FORMAT: 'xml' is not one of text, json" in capsys.readouterr().err


def test_class_names_come_from_the_config_or_imagenet():
    def resolve_class(value, num_classes, spec=None):
        names = spec.class_names if spec is not None else None
        return resolve_condition(value, "class", num_classes, names, "m")

    spec = ModelSpec("digits", "var", Path("w"), Path("t"), class_names=("zero", "one", "two"))
    assert resolve_class("Two", 3, spec) == resolve_class("2", 3, spec) == 2
    with pytest.raises(ValueError, match="give one of zero, one, two or an index"):
        resolve_class("three", 3, spec)
    assert resolve_class("goldfish", 1000, ModelSpec("in", "var", Path("w"), Path("t"))) == 1

    assert resolve_class("golden retriever", 1000) == 207
    assert resolve_class("Golden Retriever", 1000) == resolve_class("207", 1000) == resolve_class(207, 1000)
    assert resolve_class("Tinca tinca", 1000) == 0  # a WordNet synonym
    with pytest.raises(ValueError, match=r"'crane' names several ImageNet classes \(134, 517\)"):
        resolve_class("crane", 1000)
    with pytest.raises(ValueError, match="'unicorn' is not an ImageNet class name"):
        resolve_class("unicorn", 1000)
    with pytest.raises(ValueError, match="this model has 10 classes: give an index 0..9"):
        resolve_class("goldfish", 10)


def test_one_validator_for_every_condition():
    from models.conditions import ClassOutOfRange

    assert resolve_condition(" 7 ", "class", 10) == 7
    for bad in (-3, "-3", 10, "10"):
        with pytest.raises(ClassOutOfRange, match=r"class -?\d+ is out of range 0..9"):
            resolve_condition(bad, "class", 10)
    for bad in ("--3", "3-", "1.5", ""):
        with pytest.raises(ValueError, match="unknown class"):
            resolve_condition(bad, "class", 10)
    with pytest.raises(ValueError, match="a class is an index or a name, not bool"):
        resolve_condition(True, "class", 10)
    assert resolve_condition("a red star", "text") == "a red star"
    with pytest.raises(ValueError, match="model 'x' is text-conditional: give a text prompt, not a class"):
        resolve_condition(3, "text", model="x")
