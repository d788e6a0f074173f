"""Import the official FoundationVision code (VAR, LlamaGen) from a checkout named at run time.

Their code is never part of this repository: a bench takes `--official PATH` to a checkout and
imports from it with `import_isolated`. Both official repositories keep their code in top-level
packages (`models`, `utils`, `dist`, `autoregressive`, ...) meant to be imported with the checkout
as the working directory, and `models` is also the name of our package, so a plain `sys.path`
insert would hand their `import models.var` our module (or ours theirs).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from types import ModuleType


def import_isolated(root: str | Path, names: list[str], shadowed: tuple[str, ...]) -> dict[str, ModuleType]:
    """Import modules `names` from the checkout `root` and return them by name.

    `shadowed` lists the top-level package names the checkout brings (ours among them). While their
    modules import, every `sys.modules` entry under those names is set aside and the checkout goes
    first on `sys.path`; afterwards their entries are taken out again and ours, and `sys.path`, put
    back. Their modules keep working after that: each function looks names up in its own module's
    globals, which hold their modules, not `sys.modules`. Their import-time prints go to a buffer
    (they would land in the middle of a table)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SystemExit(f"--official {root}: no such directory (a checkout of the official code)")

    def under(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in shadowed)

    ours = {n: m for n, m in sys.modules.items() if under(n)}
    saved_path = list(sys.path)
    for n in ours:
        del sys.modules[n]
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return {n: importlib.import_module(n) for n in names}
    except ImportError as e:
        raise SystemExit(
            f"--official {root}: cannot import {names} from it ({type(e).__name__}: {e})"
        ) from None
    finally:
        for n in [n for n in sys.modules if under(n)]:
            del sys.modules[n]
        sys.modules.update(ours)
        sys.path[:] = saved_path
