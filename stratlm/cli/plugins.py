"""stratlm plugins: everything registered, by kind, with the package it came from."""

from __future__ import annotations

import argparse
import json
import sys

from stratlm.core.errors import plural
from stratlm.core.registry import KINDS, get_registry


def add_parser(sub) -> None:
    p = sub.add_parser("plugins", help="list model families, aliases, strategies, transforms ... and their packages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def describe(kind: str, obj) -> str:
    if kind == "model family":
        return "model types: " + ", ".join(obj.model_types) + (f"; GGUF: {', '.join(obj.gguf.architectures)}" if obj.gguf else "")
    if kind == "model alias":
        return str(obj)
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    if not doc:  # no docstring of its own: its module's says what it is
        module = sys.modules.get(getattr(obj, "__module__", "") or "")
        doc = ((module.__doc__ if module else None) or "").strip().splitlines()
    return doc[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    registry = getattr(args, "registry", None) or get_registry()
    listing = {
        kind: [{"name": e.name, "package": e.origin, "about": describe(kind, e.obj)} for e in sorted(registry.table(kind).values(), key=lambda e: e.name)]
        for kind in KINDS
    }
    if args.json:
        conflicts = [str(err) for err in registry.conflicts.values()]
        print(json.dumps({"plugins": listing, "failed": registry.failed, "conflicts": conflicts}, indent=2))
        return 0
    for kind, entries in listing.items():
        print(f"{plural(kind)}:")
        if not entries:
            print("  (none)")
        width = max((len(e["name"]) for e in entries), default=0)
        for e in entries:
            print(f"  {e['name']:<{width}}  [{e['package']}]  {e['about']}")
    for name, error in registry.failed.items():
        print(f"broken plugin (skipped): {name}: {error}")
    for err in registry.conflicts.values():
        print(f"conflict: {err}")
    return 0
