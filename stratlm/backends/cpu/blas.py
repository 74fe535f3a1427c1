"""An optimized BLAS for MLX on Linux CPU.

MLX's Linux CPU wheel takes cblas_sgemm from a bundled reference BLAS (~5 GFLOP/s here).
A library with the standard cblas symbols loaded globally *before* mlx.core is imported
takes its place (~150-200 GFLOP/s). This module must not import mlx.

STRATLM_BLAS=off disables it; STRATLM_BLAS=/path/to/lib.so picks the library.

MLX also calls sgemm for matrix-vector products (every decode step), where a GEMV is 2-3x
faster; a small shim (gemv_shim.c, built once with the system C compiler and cached) sits in
front of the library and routes those calls to its sgemv. STRATLM_BLAS_GEMV=off skips it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stratlm.env import flag

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian libopenblas0-pthread
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

#: What happened: {"library": path or None, "reason": text, "gemv_routing": shim path or None}
status: dict[str, str | None] = {"library": None, "reason": "not attempted", "gemv_routing": None}


def _pip_candidates() -> list[str]:
    prefix = Path(sys.prefix)
    found = [str(p) for p in sorted((prefix / "lib").glob("libmkl_rt.so*"))]  # PyPI mkl
    found += [str(p) for p in (prefix / "lib").glob("python3*/site-packages/cmeel.prefix/lib/libopenblas.so.0")]
    return found


def use_optimized_blas() -> dict[str, str | None]:
    """Load the first optimized BLAS found, globally; safe to call more than once."""
    if status["library"] is not None or status["reason"] != "not attempted":
        return status
    choice = os.environ.get("STRATLM_BLAS", "")
    if flag("STRATLM_BLAS") is False or choice.lower() == "reference":
        status["reason"] = "disabled by STRATLM_BLAS"
        return status
    if not sys.platform.startswith("linux"):
        status["reason"] = "not Linux: MLX uses the platform's BLAS (Accelerate on macOS)"
        return status
    if "mlx.core" in sys.modules:
        status["reason"] = "mlx.core was imported before stratlm; import stratlm first to use an optimized BLAS"
        return status
    for path in ([choice] if choice else list(CANDIDATES) + _pip_candidates()):
        if not os.path.exists(path):
            continue
        try:
            shim = load_gemv_shim(path)  # before the library: its cblas_sgemm must come first
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _ = lib.cblas_sgemm  # raises AttributeError when the library lacks plain cblas symbols
        except (OSError, AttributeError) as exc:
            status["reason"] = f"{path} unusable: {exc}"
            continue
        status.update(library=path, reason="loaded before mlx.core", gemv_routing=shim)
        return status
    status["reason"] = "no optimized BLAS found (install Debian's libopenblas0-pthread); MLX's reference BLAS is slow"
    return status


SHIM_SOURCE = Path(__file__).with_name("gemv_shim.c")


def load_gemv_shim(library: str) -> str | None:
    """Build (once, cached) and load the sgemm->sgemv shim in front of `library`; None if unavailable."""
    if flag("STRATLM_BLAS_GEMV") is False:
        return None
    try:
        built = build_gemv_shim()
        if built is None:
            return None
        shim = ctypes.CDLL(built, mode=ctypes.RTLD_GLOBAL)
        if shim.stratlm_gemv_shim_init(library.encode()) != 0:
            return None
        return built
    except OSError:
        return None


def cache_dir() -> Path:
    """Where stratlm keeps what it compiles at first use (this shim, the CPU kernels)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stratlm"


def build_gemv_shim() -> str | None:
    source = SHIM_SOURCE.read_bytes()
    cache = cache_dir()
    target = cache / f"gemv_shim-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return str(target)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(SHIM_SOURCE), "-ldl"], capture_output=True)
        if done.returncode != 0:
            return None
        os.replace(out, target)  # atomic: concurrent first imports race safely
    return str(target)
