"""What `auto` speculative windows know of a next-token model before its first image: the tokens a
pass commits per method and window (`varserve calibrate` measures them; the loader reads them from
beside the model's config, `<config dir>/<model name>.windows.json`).

- `tokens_per_pass` {method: {window: tokens}}: mean tokens a decode pass commits per image at
  that window (1 <= tokens <= window), over the calibration images. A property of the model and
  its sampling settings, not of the machine.
- `overhead_s` {window: seconds}: what a pass of that window adds per row to its forward pass
  (drafting and verification, or plain decoding's sampling at window 1, and the step's glue), as
  measured on the calibrating machine. The engine's running means of its own pass times replace it
  as passes run. Profiles without window 1 (written before it was calibrated) count it as 0.

Without a file, the first `auto` image of a method calibrates it at run time (a few seconds, that
image run alone at each window): models/llamagen/speculative.py:AutoWindow.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.settings import SPECULATIVE_METHODS

SUFFIX = ".windows.json"


@dataclass(frozen=True)
class WindowProfile:
    image_tokens: int  # tokens per image of the model it was measured on
    tokens_per_pass: dict[str, dict[int, float]]
    overhead_s: dict[int, float]
    source: dict = field(default_factory=dict)  # how it was measured: images, settings, machine

    def __post_init__(self):
        if not self.tokens_per_pass:
            raise ValueError("tokens_per_pass: no method")
        for method, per_window in self.tokens_per_pass.items():
            if method not in SPECULATIVE_METHODS or method == "none":
                raise ValueError(f"tokens_per_pass: unknown method {method!r}")
            for L, tokens in per_window.items():
                if not 1.0 <= tokens <= L:  # NaN fails too
                    raise ValueError(f"tokens_per_pass.{method}.{L}: {tokens} is not in [1, {L}]")
        for L, seconds in self.overhead_s.items():
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"overhead_s.{L}: {seconds} is not a time")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> WindowProfile:
        """Raises ValueError naming the file for anything that is not a window profile."""
        try:
            doc = json.loads(Path(path).read_text())
            return cls(
                int(doc["image_tokens"]),
                {m: {int(L): float(t) for L, t in w.items()} for m, w in doc["tokens_per_pass"].items()},
                {int(L): float(s) for L, s in doc["overhead_s"].items()},
                doc.get("source", {}),
            )
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a window profile ({type(e).__name__}: {e})") from None
