"""Builds and loads our C kernels for CPU (kernels/cpu/*.c) at first use.

They are compiled on the machine that runs them, with `-march=native`, by the system C compiler
(`$CC`, default gcc), the same way Triton builds its launchers on a GPU host, and cached under
`$VARSERVE_KERNEL_CACHE` (default ~/.cache/varserve/kernels), keyed by the source, the flags and
the CPU, so a changed kernel or a different machine gets its own build. Calls go through ctypes,
which releases the GIL for the call's duration.

Without a working compiler `load` returns None and callers keep their PyTorch path: slower on
CPU, never wrong.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "cpu"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]
# Attention may reassociate its sums and call glibc's vectorised expf: each (sequence, head) still
# runs the same instructions whatever the batch. Not the linear kernel: its row results must not
# depend on how the compiler splits a tile's sum, which depends on the tile's row count.
EXTRA = {"attention": (["-ffast-math"], ["-lmvec"])}
# Flags a kernel's results rest on, never dropped: the fused decode layers round every loop's vector
# and scalar forms alike only without contracted multiply-adds (kernels/cpu/decode.c).
REQUIRED = {"decode": ["-ffp-contract=off"]}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "varserve" / "kernels"
    return Path(os.environ.get("VARSERVE_KERNEL_CACHE", default))


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(name: str, extra: bool = True) -> Path:
    """Compiles kernels/cpu/{name}.c (if not cached) -> the shared library's path. Raises
    OSError / subprocess.CalledProcessError when there is no compiler or the build fails."""
    source = SOURCE_DIR / f"{name}.c"
    cc = os.environ.get("CC", "gcc")
    extra_flags, extra_libs = EXTRA.get(name, ([], [])) if extra else ([], [])
    command = [cc, *FLAGS, *REQUIRED.get(name, []), *extra_flags, str(source), *LIBS, *extra_libs]
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), " ".join(command).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: processes starting together never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*command, "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The kernels of kernels/cpu/{name}.c, or None (with one warning) where they cannot be built."""
    if os.environ.get("VARSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        try:
            return ctypes.CDLL(str(build(name)))
        except (OSError, subprocess.CalledProcessError):
            if name not in EXTRA:
                raise
            return ctypes.CDLL(str(build(name, extra=False)))  # e.g. no libmvec outside glibc
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(
            f"varserve: CPU kernels '{name}' unavailable, using PyTorch ops: {detail.strip()[:500]}",
            stacklevel=2,
        )
        return None


@functools.cache
def function(name: str, symbol: str, *argtypes, restype=None) -> ctypes._CFuncPtr | None:
    """C function `symbol` of kernels/cpu/{name}.c, taking `argtypes` and returning `restype`
    (void by default), or None where the kernels cannot be built."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn
