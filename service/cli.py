"""`varserve` command line: generate images from a model config, serve them over HTTP, or calibrate a
next-scale model's KV profile."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

from models.config import DEFAULT_CONFIG
from models.settings import KV_POLICY_NAMES, MAX_WINDOW, SPECULATIVE_METHODS
from service.settings import add_serve_arguments, settings_from

MAX_IMAGES = 256


def in_range(kind, lo=None, hi=None, lo_open=False):
    """argparse type: a number of `kind` within [lo, hi] (or (lo, hi] when lo_open)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a valid {kind.__name__}") from None
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if too_low or (hi is not None and value > hi):
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(
                f"{value} is outside {left}{lo}, {hi if hi is not None else 'inf'}]"
            )
        return value

    return parse


def window_arg(text: str):
    if text == "auto":
        return text
    return in_range(int, 1, MAX_WINDOW)(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varserve", description="Visual autoregressive image generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images to PNG files")
    gen.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="model config (TOML; default: the bundled shape models)",
    )
    gen.add_argument("--model", help="model name in the config (optional when it lists one model)")
    condition = gen.add_mutually_exclusive_group(required=True)
    condition.add_argument("--class", dest="class_label", help="class index or name (class models)")
    condition.add_argument("--prompt", help="text prompt (text-conditional models)")
    gen.add_argument("--n", type=in_range(int, 1, MAX_IMAGES), default=1, help="number of images")
    gen.add_argument(
        "--seed", type=in_range(int, 0, 2**63 - 1), help="seed of the first image (next: +1, ...)"
    )
    gen.add_argument("--cfg", type=in_range(float, 0, 100), help="guidance scale")
    gen.add_argument(
        "--cfg-interval",
        type=in_range(int, -1),
        help="next-token models: guide image tokens 0..N only (-1: all, the default)",
    )
    gen.add_argument(
        "--negative-prompt",
        help="text models: the caption guidance steers away from (instead of the null caption)",
    )
    gen.add_argument("--top-k", type=in_range(int, 0), help="top-k (0: off)")
    gen.add_argument("--top-p", type=in_range(float, 0, 1), help="top-p (0: off)")
    gen.add_argument("--temperature", type=in_range(float, 0, 100, lo_open=True), help="softmax temperature")
    gen.add_argument(
        "--kv-policy",
        choices=KV_POLICY_NAMES,
        help="next-scale models: what the KV cache keeps of earlier scales (default: the model's)",
    )
    gen.add_argument(
        "--kv-budget",
        type=in_range(float, 0, 1, lo_open=True),
        help="next-scale models: fraction of the full stored KV prefix kept (default: the model's)",
    )
    gen.add_argument(
        "--kv-merge",
        action=argparse.BooleanOptionalAction,
        help="next-scale models: fold evicted keys into their nearest kept key (default: the model's)",
    )
    gen.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        help="next-token models: speculative decoding (sjd, scd: the model's own distribution; gsd: lossy)",
    )
    gen.add_argument(
        "--window",
        type=window_arg,
        help=f"with --speculative: tokens verified per forward pass, 1..{MAX_WINDOW}, or auto",
    )
    for flag, kind, meaning in (  # GSD's grouping knobs: the request's speculative.group, ...
        ("--gsd-group", in_range(int, 0), "neighbours either side in the ranking"),
        ("--gsd-p-threshold", in_range(float, 0, 1, lo_open=True), "probability closeness to the draft's"),
        ("--gsd-distance", in_range(float, 0, None, lo_open=True), "squared embedding distance / the mean's"),
    ):
        gen.add_argument(flag, type=kind, help=f"with --speculative gsd: {meaning}")
    gen.add_argument("--batch-size", type=in_range(int, 1, 256), default=16, help="images per forward batch")
    gen.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    gen.set_defaults(subparser=gen)
    cal = sub.add_parser(
        "calibrate",
        help="measure a model and write its profile: a next-scale model's attention (its KV profile, "
        "models/kv/calibrate.py) or a next-token model's speculative acceptance per window (its window "
        "profile, models/llamagen/calibrate.py)",
    )
    cal.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="model config (TOML; default: the bundled shape models)",
    )
    cal.add_argument("--model", required=True, help="model name in the config")
    cal.add_argument(
        "--prompts",
        type=in_range(int, 1, MAX_IMAGES),
        help="images generated (seeds 0..N-1; default 16 for a next-scale model, 2 per method and "
        "window for a next-token one)",
    )
    cal.add_argument(
        "--out",
        type=Path,
        help="profile file (default: <config dir>/<model>.kvprofile.json, or .windows.json for a next-token model)",
    )
    cal.set_defaults(subparser=cal)
    serve = sub.add_parser("serve", help="run the HTTP server (settings also from VARSERVE_* variables)")
    add_serve_arguments(serve)
    serve.set_defaults(subparser=serve)
    return parser


def pick_model(specs, name: str | None, parser: argparse.ArgumentParser):
    names = [s.name for s in specs]
    if name is None:
        if len(specs) == 1:
            return specs[0]
        parser.error(f"--model is required: the config lists {', '.join(names)}")
    for spec in specs:
        if spec.name == name:
            return spec
    parser.error(f"--model '{name}' is not in the config (it lists {', '.join(names)})")


def generate_command(args, parser: argparse.ArgumentParser) -> int:
    from models.conditions import ClassOutOfRange
    from models.config import ConfigError, load_config
    from models.loading import CheckpointError
    from models.runner import load_runner
    from models.runtime import use_device
    from models.settings import SettingError, settings_for
    from service.images import to_pil

    if args.prompt is not None and not args.prompt.strip():  # the server's 422 for an empty prompt
        parser.error("--prompt: is empty")
    # before the model loads: a path that cannot take the images is an error at once
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot make the directory {args.out}: {e.strerror}")
    if not os.access(args.out, os.W_OK):
        parser.error(f"--out: the directory {args.out} is not writable")
    try:
        spec = pick_model(load_config(args.config), args.model, parser)
        use_device(spec.device)  # Triton launches on the thread's current device
        runner = load_runner(spec)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"varserve: error: {e}", file=sys.stderr)
        return 1
    if runner.conditioning == "class" and args.prompt is not None:
        parser.error(f"'{spec.name}' is class-conditional: use --class, not --prompt")
    if runner.conditioning == "text" and args.prompt is None:
        parser.error(f"'{spec.name}' is text-conditional: use --prompt, not --class")
    flag = "--class" if args.prompt is None else "--prompt"
    try:
        condition = runner.resolve(args.class_label if args.prompt is None else args.prompt)
    except ClassOutOfRange as e:
        parser.error(f"--class {e.index} is out of range 0..{e.num_classes - 1} for '{spec.name}'")
    except ValueError as e:
        parser.error(f"{flag}: {e}")
    first_seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    params = settings_for(
        spec.defaults,
        first_seed,
        args.n,
        args.cfg,
        args.top_k,
        args.top_p,
        args.temperature,
        args.negative_prompt,
        args.cfg_interval,
        args.kv_policy,
        args.kv_budget,
        {
            k: v
            for k, v in (
                ("method", args.speculative),
                ("window", args.window),
                ("group", args.gsd_group),
                ("p_threshold", args.gsd_p_threshold),
                ("distance", args.gsd_distance),
            )
            if v is not None
        },
        kv_merge=args.kv_merge,
    )
    try:
        runner.check(params[0])
    except SettingError as e:
        flag = {
            "speculative.method": "speculative",
            "speculative.window": "window",
            "speculative.group": "gsd_group",
            "speculative.p_threshold": "gsd_p_threshold",
            "speculative.distance": "gsd_distance",
        }.get(e.field, e.field)
        parser.error(f"--{flag.replace('_', '-')}: {e}")
    what = f"class {condition}" if args.prompt is None else f"prompt {condition!r}"
    print(f"{spec.name}: {what}, seeds {first_seed}..{first_seed + args.n - 1}", file=sys.stderr)
    unit = "scale" if runner.family == "var" else "row"
    with tqdm(total=args.n * runner.steps, unit=unit, file=sys.stderr) as bar:
        for start in range(0, args.n, args.batch_size):
            chunk = params[start : start + args.batch_size]
            result = runner.generate(
                [condition] * len(chunk), chunk, on_step=lambda step: bar.update(step.tokens.shape[0])
            )
            for i, image in enumerate(to_pil(result.images), start=start):
                path = args.out / f"{i}.png"
                try:
                    image.save(path)
                except OSError as e:
                    print(f"varserve: error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
                    return 1
                print(path, flush=True)
    return 0


def calibrate_command(args, parser: argparse.ArgumentParser) -> int:
    from models.config import ConfigError, load_config, profile_path
    from models.loading import CheckpointError

    try:
        specs = load_config(args.config)
    except ConfigError as e:
        print(f"varserve: error: {e}", file=sys.stderr)
        return 1
    spec = pick_model(specs, args.model, parser)
    if spec.family == "var":
        from models.kv.calibrate import calibrate, summary

        prompts = 16 if args.prompts is None else args.prompts
    else:
        from models.llamagen.calibrate import calibrate_windows as calibrate
        from models.llamagen.calibrate import summary

        prompts = 2 if args.prompts is None else args.prompts
    named = spec.kv_profile if spec.family == "var" else spec.window_profile
    out = args.out or named or profile_path(Path(args.config).parent, spec.name, spec.family)
    images = f"{prompts} images" if spec.family == "var" else f"{prompts} images per method and window"
    print(f"{spec.name}: calibrating on {images}", file=sys.stderr)
    try:
        profile = calibrate(spec, prompts)
    except (CheckpointError, ValueError) as e:
        print(f"varserve: error: {e}", file=sys.stderr)
        return 1
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        profile.save(out)
    except OSError as e:
        print(f"varserve: error: cannot write the profile {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(summary(profile))
    print(out, flush=True)
    return 0


def serve_command(args, parser: argparse.ArgumentParser) -> int:
    from models.config import ConfigError
    from service.server import serve

    try:
        settings = settings_from(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        return serve(settings)
    except ConfigError as e:
        print(f"varserve: error: {e}", file=sys.stderr)
        return 1


def use_usable_cpus() -> None:
    """The offline commands run the models on every CPU this process may use, a container's CPU
    quota counted (service/cpus.py); torch's own default counts the host's cores. OMP_NUM_THREADS,
    when set, stays the user's choice."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    from service.cpus import usable_cpus

    torch.set_num_threads(usable_cpus())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("generate", "calibrate"):
        use_usable_cpus()
    if args.command == "generate":
        return generate_command(args, args.subparser)
    if args.command == "serve":
        return serve_command(args, args.subparser)
    if args.command == "calibrate":
        return calibrate_command(args, args.subparser)
    return 2


if __name__ == "__main__":
    sys.exit(main())
