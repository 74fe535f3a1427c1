"""Where ops built now run (MLX's default device): asked in one place."""

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
