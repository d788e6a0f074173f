"""`varserve calibrate` for a next-token model: the tokens a speculative pass commits per method and
window, written as its window profile (models/llamagen/window_profile.py), so `auto` windows choose
well from a model's first image instead of calibrating on it.

Image i has seed i and, for a class model, a class spread evenly over its classes
(models/kv/calibrate.py:calibration_classes), for a text model the i-th of CALIBRATION_CAPTIONS
(cycled); each is generated alone at every window `auto` chooses from, with the model's sampling
defaults and GSD knobs, by every speculative method.
"""

from __future__ import annotations

import platform
from dataclasses import replace

from models.kv.calibrate import calibration_classes
from models.llamagen.speculative import CALIBRATION, WINDOWS
from models.llamagen.window_profile import WindowProfile
from models.settings import SPECULATIVE_METHODS, settings_for

# Generic captions: acceptance depends on the image more than on the wording.
CALIBRATION_CAPTIONS = (
    "a red circle",
    "a photo of a dog on the grass",
    "a small blue star in the top left corner",
    "a mountain landscape at sunset",
    "a big green square",
    "a portrait of an old man",
    "a yellow heart, bottom right",
    "a city street at night",
)


def calibrate_windows(spec, n: int) -> WindowProfile:
    """Load a next-token model from its ModelSpec (ignoring any window profile it names), run n
    images per method at each window -> its window profile."""
    from models.llamagen.runner import LlamaGenRunner

    runner = LlamaGenRunner(replace(spec, window_profile=None))
    if runner.conditioning == "class":
        conditions = calibration_classes(n, runner.num_classes)
    else:
        conditions = [CALIBRATION_CAPTIONS[i % len(CALIBRATION_CAPTIONS)] for i in range(n)]
    methods = [m for m in SPECULATIVE_METHODS if m != "none"]
    for method in methods:
        speculative = {"method": method, "window": "auto"}
        for i, condition in enumerate(conditions):
            (settings,) = settings_for(spec.defaults, i, 1, speculative=speculative)

            def run_alone(s, condition=condition):
                out = runner.generate([condition], [s])
                return out.forward_passes, runner.engine_rows([s])

            runner.auto.calibrate(settings, run_alone)
    d = spec.defaults
    source = {
        "model": spec.name,
        "images": n,
        "methods": methods,
        "windows": list(CALIBRATION),
        "overhead_windows": list(WINDOWS),
        "sampling": {"cfg": d.cfg, "top_k": d.top_k, "top_p": d.top_p, "temperature": d.temperature},
        "gsd": {
            "group": d.speculative.group,
            "p_threshold": d.speculative.p_threshold,
            "distance": d.speculative.distance,
        },
        "overhead_measured_on": f"{platform.machine()} {platform.processor() or platform.system()}, {runner.spec.device}",
    }
    return runner.auto.profile(source)


def summary(profile: WindowProfile) -> str:
    """The table the CLI prints: tokens a pass commits per method and window."""
    windows = sorted({L for w in profile.tokens_per_pass.values() for L in w})
    lines = ["method " + "".join(f"{f'L={L}':>8}" for L in windows)]
    for method, per_window in profile.tokens_per_pass.items():
        lines.append(f"{method:<7}" + "".join(f"{per_window.get(L, float('nan')):>8.2f}" for L in windows))
    return "\n".join(lines)
