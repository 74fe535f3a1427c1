"""Options and transforms written as text (the command line, a draft source's spec)."""

from __future__ import annotations

import json
from typing import Any, Sequence

from stratlm.core.errors import ConfigError


def parse_value(text: str) -> Any:
    """A command-line value: JSON where it parses (4, 0.5, true, [1, 2]), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: Sequence[str], what: str = "option") -> dict[str, Any]:
    """["n=4", "mode=drop"] -> {"n": 4, "mode": "drop"} (dashes in keys become underscores)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {pair!r} is not KEY=VALUE (e.g. n=4)")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def parse_transform_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Transforms written as text, separated by commas: NAME or NAME:KEY=VALUE starts one, a
    further KEY=VALUE adds an option to it. "collapse:n=24,mode=drop,heal:steps=30" ->
    [("collapse", {"n": 24, "mode": "drop"}), ("heal", {"steps": 30})]."""
    specs: list[tuple[str, list[str]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, colon, option = item.partition(":")
        if colon or "=" not in item:
            specs.append((name.strip(), [option] if option else []))
        elif specs:
            specs[-1][1].append(item)
        else:
            raise ConfigError(f"transform option {item!r} comes before any transform name (write e.g. collapse:n=4,mode=drop)")
    return [(name, parse_options(options, what=f"transform option of {name}")) for name, options in specs]
