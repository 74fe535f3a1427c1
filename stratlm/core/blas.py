"""An optimized BLAS for MLX on Linux CPU.

MLX's Linux CPU wheel takes cblas_sgemm from a bundled reference BLAS (~5 GFLOP/s here).
A library with the standard cblas symbols loaded globally *before* mlx.core is imported
takes its place (~150-200 GFLOP/s). This module must not import mlx.

STRATLM_BLAS=off disables it; STRATLM_BLAS=/path/to/lib.so picks the library.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian libopenblas0-pthread
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

#: What happened: {"library": path or None, "reason": text}
status: dict[str, str | None] = {"library": None, "reason": "not attempted"}


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
    if choice.lower() in ("off", "0", "none", "reference"):
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
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            getattr(lib, "cblas_sgemm")
        except (OSError, AttributeError) as exc:
            status["reason"] = f"{path} unusable: {exc}"
            continue
        status.update(library=path, reason="loaded before mlx.core")
        return status
    status["reason"] = "no optimized BLAS found (install Debian's libopenblas0-pthread); MLX's reference BLAS is slow"
    return status
