"""Checking strategy options. Values may arrive as strings (`stratlm generate --option n=4`)."""

from __future__ import annotations

from typing import Any, Callable

from stratlm.core.errors import ConfigError
from stratlm.core.registry import Registry


def int_option(strategy: str, name: str, value: Any, minimum: int = 1) -> int:
    """An integer option >= minimum; accepts "4" as well as 4."""
    try:
        number = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"strategy {strategy!r}: option {name} must be an integer >= {minimum}, got {value!r}")
    return number


def plugin_option(strategy: str, name: str, value: Any, kind: str, registry: Registry) -> tuple[str, Callable[..., Any]]:
    """(display name, callable) for a callable given directly, or the name of one registered as `kind` (e.g. "scorer")."""
    if callable(value):
        return getattr(value, "__name__", type(value).__name__), value
    if isinstance(value, str):
        return value, registry.get(kind, value)
    known = ", ".join(registry.names(kind))
    raise ConfigError(f"strategy {strategy!r}: option {name} must be a callable or the name of a registered {kind} ({known}), got {type(value).__name__}")
