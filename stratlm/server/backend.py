"""What the server runs requests on: an Engine, whose scheduler (continuous batching) takes every
request through `engine.submit(...)` and reports `engine.metrics()`."""

from __future__ import annotations

import inspect
from typing import Any


def make_backend(engine_args: dict[str, Any], *, max_running: int | None = None, max_queue: int | None = None, kv_budget: int | None = None):
    """An Engine built from engine_args with its scheduler configured (unset values: the scheduler's defaults)."""
    from stratlm import Engine

    scheduler = {k: v for k, v in {"max_running": max_running, "max_queue": max_queue, "kv_budget": kv_budget}.items() if v is not None}
    return Engine(**engine_args, scheduler=scheduler)


def supported_params() -> frozenset[str]:
    """The generation parameters this build's engine takes: the server answers 400 for a field it cannot honour."""
    from stratlm.engine import make_params

    return frozenset(set(inspect.signature(make_params).parameters) - {"default_temperature"})
