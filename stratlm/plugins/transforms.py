"""Built-in transforms, registered through the `stratlm` entry-point group."""

import json
from pathlib import Path

from stratlm.engine import apply_transforms
from stratlm.specs import parse_transform_specs
from stratlm.core.hookspecs import hookimpl
from stratlm.core.registry import get_registry
from stratlm.transforms.collapse import collapse
from stratlm.transforms.dora import CONFIG_FILE, FINE_TUNE_TYPES, dora, fuse, with_adapter
from stratlm.transforms.heal import heal

TRANSFORMS = {"collapse": collapse, "heal": heal, "fuse": fuse, "dora": dora}


@hookimpl
def register_transforms(register):
    for name, transform in TRANSFORMS.items():
        register(name, transform)


@hookimpl
def load_adapter(loaded, path):
    """mlx-lm-format DoRA and LoRA adapter folders (adapters.safetensors + adapter_config.json)."""
    try:
        kind = json.loads((Path(path) / CONFIG_FILE).read_text()).get("fine_tune_type", "lora")
    except (OSError, ValueError):
        kind = None  # unreadable: let with_adapter name the problem
    if kind is not None and kind not in FINE_TUNE_TYPES:
        return None
    return with_adapter(loaded, path)


@hookimpl
def register_draft_sources(register):
    register("self", self_draft)


def self_draft(target, spec):
    """Draft source "self:T1,T2": the target transformed by the named transforms (default
    collapse,heal), used as a draft model, so no second pretrained model is needed. Options as
    on the command line: "self:collapse:n=24,heal:steps=30"."""
    registry = get_registry()
    draft = apply_transforms(target, parse_transform_specs(spec or "collapse,heal"), registry)
    return registry.get("draft source", "model")(target, draft)
