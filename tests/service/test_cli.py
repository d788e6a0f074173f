"""`varserve generate` end to end, as a user runs it."""

import os
import subprocess
import sys

from PIL import Image

from tests.conftest import REPO

CONFIG = REPO / "configs" / "fixtures.toml"


def varserve(*args):
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_generate_writes_pngs_and_prints_their_paths(tmp_path):
    out = tmp_path / "imgs"
    run = varserve(
        "generate", "--config", CONFIG, "--class", 3, "--n", 3, "--seed", 5, "--batch-size", 2, "--out", out
    )
    assert run.returncode == 0, run.stderr
    paths = run.stdout.split()
    assert paths == [str(out / f"{i}.png") for i in range(3)]
    for p in paths:
        image = Image.open(p)
        assert (image.size, image.mode) == ((256, 256), "RGB")
    assert "scale" in run.stderr  # progress bar

    again = varserve(
        "generate", "--config", CONFIG, "--class", 3, "--n", 1, "--seed", 6, "--out", tmp_path / "b"
    )
    assert again.returncode == 0, again.stderr
    # seed 6 is the second image of the first run: the same pixels, whatever the batch
    assert Image.open(out / "1.png").tobytes() == Image.open(tmp_path / "b" / "0.png").tobytes()


def test_bad_values_exit_non_zero_with_a_message(tmp_path, capsys):
    cases = [
        (["--class", 10], "--class 10 is out of range 0..9"),
        (["--class=-3"], "--class -3 is out of range 0..9"),
        (["--class", 1, "--top-p", 1.5], "argument --top-p: 1.5 is outside [0, 1]"),
        (["--class", 1, "--n", 0], "argument --n: 0 is outside [1, 256]"),
        (["--class", "cat"], "--class: unknown class 'cat' for model 'var-fixture': give a class index"),
        (["--class", 1, "--temperature", 0], "argument --temperature: 0.0 is outside (0, 100]"),
        (["--class", 1, "--model", "nope"], "--model 'nope' is not in the config"),
        (["--class", 1, "--cfg-interval", 3], "--cfg-interval: model 'var-fixture' is next-scale"),
        (["--class", 1, "--kv-policy", "lru"], "argument --kv-policy: invalid choice: 'lru'"),
        (["--class", 1, "--kv-budget", 0], "argument --kv-budget: 0.0 is outside (0, 1]"),
        (
            ["--class", 1, "--negative-prompt", "a dog"],
            "--negative-prompt: model 'var-fixture' is class-conditional: negative_prompt needs a text model",
        ),
        (["--class", 1, "--speculative", "sjd"], "--speculative: model 'var-fixture' is next-scale"),
        (["--class", 1, "--speculative", "fast"], "argument --speculative: invalid choice: 'fast'"),
        (["--class", 1, "--speculative", "sjd", "--window", 0], "argument --window: 0 is outside [1, 32]"),
        (
            ["--class", 1, "--speculative", "gsd", "--gsd-group", -1],
            "argument --gsd-group: -1 is outside [0, inf]",
        ),
        (
            ["--class", 1, "--speculative", "gsd", "--gsd-p-threshold", 0],
            "argument --gsd-p-threshold: 0.0 is outside (0, 1]",
        ),
        (
            ["--class", 1, "--speculative", "gsd", "--gsd-distance", 0],
            "argument --gsd-distance: 0.0 is outside (0, inf]",
        ),
    ]
    run = varserve("generate", "--config", CONFIG, "--out", tmp_path, *cases[0][0])  # the real exit path
    assert run.returncode == 2 and cases[0][1] in run.stderr, run.stderr
    for args, message in cases[1:]:  # the rest in this process: a subprocess each cost 80 s in all
        assert exit_code(["generate", "--config", CONFIG, "--out", tmp_path, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    assert not list(tmp_path.glob("*.png"))


def test_an_empty_prompt_or_an_out_path_that_cannot_take_images_exits_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = [
        (["--prompt", " "], "--prompt: is empty"),
        (["--class", 1, "--out", afile], f"--out: cannot make the directory {afile}: File exists"),
        (
            ["--class", 1, "--out", afile / "sub"],
            f"--out: cannot make the directory {afile / 'sub'}: Not a directory",
        ),
    ]
    if not os.access(locked, os.W_OK):  # root writes anywhere
        cases.append((["--class", 1, "--out", locked], f"--out: the directory {locked} is not writable"))
    for args, message in cases:
        assert exit_code(["generate", "--config", CONFIG, "--out", tmp_path, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def exit_code(argv) -> int:
    """What `varserve ARGV` exits with, run in this process (argparse errors raise SystemExit)."""
    from service.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_missing_config_and_bad_checkpoint_exit_1(tmp_path):
    run = varserve("generate", "--config", tmp_path / "none.toml", "--class", 1)
    assert run.returncode == 1 and "none.toml: no such config file" in run.stderr
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[[model]]\nname = "m"\nfamily = "var"\nweights = "{bad}"\ntokenizer = "{bad}"\n')
    run = varserve("generate", "--config", cfg, "--class", 1)
    assert run.returncode == 1 and "bad.pth: not a readable checkpoint" in run.stderr


def test_llamagen_class_model_and_condition_mismatch(tmp_path):
    config = REPO / "configs" / "fixtures-llamagen.toml"
    run = varserve("generate", "--config", config, "--class", 2, "--n", 2, "--seed", 1, "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    assert Image.open(tmp_path / "1.png").size == (256, 256)
    args = ["generate", "--config", config, "--class", 2, "--seed", 2, "--speculative", "scd", "--window", 8]
    run = varserve(*args, "--out", tmp_path / "s")
    assert run.returncode == 0, run.stderr
    # seed 2 is the second image above: with speculation, another draw of the same distribution
    assert Image.open(tmp_path / "s" / "0.png").size == (256, 256)
    gsd = [
        "--speculative",
        "gsd",
        "--window",
        8,
        "--gsd-group",
        2,
        "--gsd-p-threshold",
        0.5,
        "--gsd-distance",
        3,
    ]
    run = varserve("generate", "--config", config, "--class", 2, "--seed", 2, *gsd, "--out", tmp_path / "g")
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "g" / "0.png").size == (256, 256)
    run = varserve("generate", "--config", config, "--prompt", "a cat", "--out", tmp_path)
    assert run.returncode == 2
    assert "'llamagen-c2i-fixture' is class-conditional: use --class, not --prompt" in run.stderr
    run = varserve("generate", "--config", config, "--class", 1, "--prompt", "a cat")
    assert run.returncode == 2 and "not allowed with argument" in run.stderr


def test_without_config_the_bundled_models_generate(tmp_path):
    run = varserve("generate", "--model", "var-shapes", "--class", "star", "--n", 2, "--out", tmp_path / "v")
    assert run.returncode == 0, run.stderr
    assert [Image.open(p).size for p in run.stdout.split()] == [(64, 64), (64, 64)]
    prompt = "a small red star in the top left corner"
    t2i = ["generate", "--model", "llamagen-shapes-t2i", "--prompt", prompt, "--out", tmp_path / "t"]
    run = varserve(*t2i, "--negative-prompt", "a blue circle")
    assert run.returncode == 0, run.stderr
    assert Image.open(run.stdout.split()[0]).size == (64, 64)
    assert "Loading weights" not in run.stderr  # the text encoder loads quietly
    run = varserve(*t2i, "--negative-prompt", "a blue circle", "--cfg", 1)
    assert run.returncode == 2
    assert "--negative-prompt: negative_prompt needs guidance, and this request has none" in run.stderr


def test_imagenet_class_names_work_on_the_cli_as_on_the_server(tmp_path):
    """A 1000-class model takes "golden retriever" from `varserve generate` too (one validator)."""
    import torch

    from models.var.model import VAR, VARConfig

    torch.manual_seed(0)
    model = VAR(VARConfig(depth=1, embed_dim=64, num_heads=1, num_classes=1000, mlp_hidden=128))
    torch.save(model.state_dict(), tmp_path / "var1000.pth")
    vae = REPO.parent / "shared" / "fixtures" / "reference" / "var_vae.pth"
    config = tmp_path / "m.toml"
    config.write_text(
        f'[[model]]\nname = "in1k"\nfamily = "var"\nweights = "var1000.pth"\ntokenizer = "{vae}"\n'
    )
    run = varserve("generate", "--config", config, "--class", "golden retriever", "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr
    assert "in1k: class 207" in run.stderr
    run = varserve("generate", "--config", config, "--class", "crane", "--out", tmp_path / "o")
    assert run.returncode == 2 and "'crane' names several ImageNet classes" in run.stderr


def test_the_offline_commands_run_on_the_cpus_the_quota_allows(monkeypatch):
    import torch

    from service.cli import use_usable_cpus

    before = torch.get_num_threads()
    monkeypatch.setattr("service.cpus.usable_cpus", lambda: 3)  # e.g. docker run --cpus 3
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        use_usable_cpus()
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stays
        use_usable_cpus()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
