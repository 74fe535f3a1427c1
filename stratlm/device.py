"""Device policy, asked in one place: where ops built now run (MLX's default device) and the dtype
that suits it."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx


def cpu_active() -> bool:
    """Whether ops built now run on the CPU."""
    return mx.default_device() == mx.cpu


def cuda_active() -> bool:
    """Whether ops built now run on a CUDA GPU."""
    return mx.default_device() == mx.gpu and _has_cuda()


@lru_cache(maxsize=1)
def _has_cuda() -> bool:
    return mx.cuda.is_available()


def default_dtype() -> mx.Dtype:
    """bf16 on a GPU, fp32 on the CPU (bf16/fp16 matmuls are slow there)."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
