"""CPU kernels for MLX, built at first use: `quantized_matmul` on affine-quantized weights.

`quantized_matmul(x, w, scales, biases, group_size=, bits=)` computes what
`x @ mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).T` computes, lazily, as an
MLX Primitive on the CPU stream, reading the 4- or 8-bit weights directly (decode) or through
dequantized fp32 tiles and cblas_sgemm (prefill). Gradients flow to x. fp16 scales and biases
(both) are read as they are (the decode kernels take them directly: fewer bytes a token); other
dtypes are made fp32.

With int8 activations (opt-in: STRATLM_KERNELS_EXACT=0 or set_exact(False)) each row is quantized
per block of 32 and the 4- or 8-bit weights meet it in integer dot products (AVX2 maddubs, AVX-VNNI
or AVX-512 VNNI, picked from CPUID at run time), within `q8_error_bound` of the exact product; many
rows take the GEMM path on the same int8-rounded rows. Exact fp32 activations are the default
(equal to the dequantized reference). Either way a row's product does not depend on how many rows
share the call (batch = solo).

The extension (quantized.cpp + nanobind) is compiled once with the system C++ compiler and
cached under ${XDG_CACHE_HOME:-~/.cache}/stratlm/, keyed by the sources, MLX, nanobind, Python
and the flags. `available()` says whether it loaded and passed its self-test; `status` says why
not. STRATLM_KERNELS=off disables it. Import stratlm before mlx.core (the optimized BLAS).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from stratlm.backends.cpu.blas import cache_dir
from stratlm.core.log import get_logger
from stratlm.env import flag

log = get_logger(__name__)

SOURCE_DIR = Path(__file__).parent
SOURCES = ("quantized.cpp", "quantized_kernel.h", "q8_kernel.h", "decode_block.h")
MODULE = "_stratlm_quantized"
# NB_DOMAIN=mlx: MLX's Python module registers mx.array in nanobind's "mlx" domain
CXXFLAGS = ("-std=c++20", "-O3", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS", "-DNB_DOMAIN=mlx")

#: what quantized_matmul takes (the extension checks the same)
BITS, GROUP_SIZES = (4, 8), (32, 64, 128)

#: why the extension is or is not in use
status = "not attempted"
_module = None
_lock = threading.Lock()


def available() -> bool:
    """True when the extension is built, loaded and passed its self-test."""
    return _load() is not None


def quantized_matmul(x, w, scales, biases, *, group_size: int, bits: int):
    """x @ mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).T as one lazy MLX op."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"stratlm kernels unavailable: {status}")
    return mod.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)


def extension():
    """The loaded extension module (isa/set_isa, threads/set_threads, ...), or None."""
    return _load()


def _load():
    global _module, status
    if _module is not None or status != "not attempted":
        return _module
    with _lock:
        if _module is not None or status != "not attempted":
            return _module
        try:
            _module, status = _try_load()
        except Exception as exc:  # a broken build must never break inference
            _module, status = None, f"failed: {type(exc).__name__}: {exc}"
        log.debug("kernels", status=status)
        return _module


def _try_load():
    if flag("STRATLM_KERNELS") is False:
        return None, "disabled by STRATLM_KERNELS"
    import mlx.core as mx

    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"unsupported platform {sys.platform}"
    try:
        built = build()
    except BuildError as exc:
        return None, str(exc)
    spec = importlib.util.spec_from_file_location(MODULE, built, loader=importlib.machinery.ExtensionFileLoader(MODULE, str(built)))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    problem = _self_test(mod, mx)
    if problem:
        return None, f"self-test failed ({problem}); disabled"
    return mod, f"loaded {built.name} (isa {mod.isa()}, {mod.threads()} threads)"


def _self_test(mod, mx) -> str | None:
    """Compare with mx.dequantize + matmul on the CPU, in the exact mode and (within its error
    bound, q8_error_bound) with int8 activations; a description of the disagreement, or None."""
    exact = mod.exact()
    try:
        with mx.stream(mx.cpu):
            key = mx.random.key(0)
            for bits in (4, 8):
                for m in (1, 5, 40):
                    k1, k2, key = mx.random.split(key, 3)
                    w = mx.random.normal((37, 128), key=k1)
                    x = mx.random.normal((m, 128), key=k2)
                    q, s, b = mx.quantize(w, group_size=32, bits=bits)
                    wd = mx.dequantize(q, s, b, group_size=32, bits=bits)
                    want = x @ wd.T
                    scale = max(mx.max(mx.abs(want)).item(), 1.0)
                    for mode in (True, False):
                        mod.set_exact(mode)
                        got = mod.quantized_matmul(x, q, s, b, group_size=32, bits=bits)
                        excess = mx.abs(got - want) - (0 if mode else q8_error_bound(x, wd)) - 1e-4 * scale
                        if not mx.max(excess).item() <= 0:
                            return f"bits={bits} M={m} exact={mode}: error exceeds the bound by {mx.max(excess).item():g}"
    except Exception as exc:  # e.g. a nanobind ABI mismatch: mx.array not accepted
        return f"{type(exc).__name__}: {exc}"
    finally:
        mod.set_exact(exact)
    return None


def q8_error_bound(x, w):
    """The most int8 activations (per block of 32, d = max|x| / 127) can move x @ w.T, before
    fp32 rounding: each x moves by at most d / 2, so |error| <= sum_j d_j / 2 * sum_{k in j} |w_k|."""
    import mlx.core as mx

    *lead, k = x.shape
    blocks = x.reshape(-1, k // 32, 32)
    half_d = mx.max(mx.abs(blocks), axis=-1) / 254.0  # (M, NB)
    w_abs = mx.abs(w).reshape(w.shape[0], k // 32, 32).sum(axis=-1)  # (N, NB)
    return (half_d @ w_abs.T).reshape(*lead, w.shape[0])


@contextlib.contextmanager
def exact_mode(on: bool = True):
    """set_exact(on) inside the block, the previous setting after it."""
    mod = _load()
    before = mod.exact() if mod is not None else None
    set_exact(on)
    try:
        yield
    finally:
        if before is not None:
            mod.set_exact(before)


def set_exact(on: bool) -> None:
    """fp32 activations (exact against the dequantized weights) instead of int8 per block of 32
    (faster; within q8_error_bound). Also STRATLM_KERNELS_EXACT=1."""
    mod = _load()
    if mod is not None:
        mod.set_exact(bool(on))


class BuildError(Exception):
    pass


def _versions() -> dict[str, str]:
    import mlx.core as mx
    import nanobind

    return {"mlx": mx.__version__, "nanobind": nanobind.__version__, "python": sys.version, "platform": sysconfig.get_platform()}


def build() -> Path:
    """Compile the extension once (cached); its path. Raises BuildError with the reason."""
    try:
        import nanobind
    except ImportError:
        raise BuildError("nanobind is not installed (pip install nanobind==3.1.0)") from None
    import mlx.core as mx

    mlx_dir = Path(mx.__file__).parent
    include, lib = mlx_dir / "include", mlx_dir / "lib"
    libmlx = lib / ("libmlx.dylib" if sys.platform == "darwin" else "libmlx.so")
    if not (include / "mlx" / "mlx.h").exists() or not libmlx.exists():
        raise BuildError(f"MLX headers or library not found under {mlx_dir}")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise BuildError("no C++ compiler found (set CXX)")
    nb_dir = Path(nanobind.source_dir()).parent
    key = hashlib.sha256()
    for name in SOURCES:
        key.update((SOURCE_DIR / name).read_bytes())
    key.update(repr((_versions(), CXXFLAGS, compiler)).encode())
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    cache = cache_dir()
    target = cache / f"{MODULE}-{key.hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    includes = ["-I", nanobind.include_dir(), "-I", str(nb_dir / "ext" / "robin_map" / "include"),
                "-I", sysconfig.get_paths()["include"], "-I", str(include), "-I", str(SOURCE_DIR)]
    link = ["-shared", str(libmlx), f"-Wl,-rpath,{lib}"]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # nanobind's library (cached on its own: it does not change with our sources) and the
        # kernels compile in parallel
        nb_src = Path(nanobind.source_dir()) / "nb_combined.cpp"
        nb_key = hashlib.sha256(repr((nanobind.__version__, sys.version, CXXFLAGS, compiler)).encode()).hexdigest()[:16]
        nb_obj = cache / f"nb_combined-{nb_key}.o"
        jobs = []
        if not nb_obj.exists():
            jobs.append((nb_src, Path(tmp) / "nb_combined.o", nb_obj))
        jobs.append((SOURCE_DIR / "quantized.cpp", Path(tmp) / "quantized.o", None))
        procs = []
        for src, obj, _ in jobs:
            cmd = [compiler, *CXXFLAGS, *includes, "-c", str(src), "-o", str(obj)]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for (cmd, proc), (_, obj, keep) in zip(procs, jobs):
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise BuildError(f"build failed: {cmd[-3]}: {out.decode(errors='replace')[-2000:]}")
            if keep is not None:
                os.replace(obj, keep)
        out_path = Path(tmp) / target.name
        done = subprocess.run([compiler, str(Path(tmp) / "quantized.o"), str(nb_obj), "-o", str(out_path), *link], capture_output=True)
        if done.returncode != 0:
            raise BuildError(f"link failed: {done.stderr.decode(errors='replace')[-2000:]}")
        os.replace(out_path, target)  # atomic: concurrent first uses race safely
    log.debug("kernels built", path=str(target), seconds=round(time.monotonic() - start, 1))
    return target
