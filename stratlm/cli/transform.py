"""stratlm transform [MODEL] NAME[:k=v,...] ... --out DIR: apply transforms in order and save the result."""

from __future__ import annotations

import argparse
from pathlib import Path

from stratlm.core.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("transform", help="apply transforms (collapse, heal, fuse, ...) and save an ordinary model folder",
                       description="Example: stratlm transform smollm2-135m collapse:n=6 heal --out smollm2-collapsed")
    p.add_argument("items", nargs="+", metavar="[MODEL] TRANSFORM",
                   help="an optional model source, then transform names with options, e.g. collapse:n=6,mode=drop")
    p.add_argument("--out", required=True, help="folder for the transformed model (config.json, model.safetensors, tokenizer)")
    p.add_argument("--adapter", default=None, help="apply this adapter folder before the transforms")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantized", choices=("keep", "dequantize"), default=None)
    p.add_argument("--report", action="store_true", help="also measure KL to the original, top-1 agreement and perplexity on held-out teacher text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stratlm.engine import apply_adapter, apply_transforms, check_transform_options
    from stratlm.loaders.loading import load_model, save_model
    from stratlm.core.registry import get_registry
    from stratlm.transforms.collapse import collapse_report, format_report
    from stratlm.transforms.heal import format_heal_report, heal_report, teacher_texts
    from stratlm.transforms.texts import heldout_prompts
    from stratlm.training.trainer import print_progress

    from .common import parse_transforms

    registry = getattr(args, "registry", None) or get_registry()
    known = set(registry.names("transform"))
    items = list(args.items)
    model = None if items[0].partition(":")[0] in known else items.pop(0)
    if not items:
        raise ConfigError(f"name at least one transform after the model ({model!r} was read as the model); known transforms: {', '.join(sorted(known))}")
    specs = [(name, {"on_progress": print_progress, **options} if name == "heal" else options) for name, options in parse_transforms(items)]
    for name, options in specs:  # unknown names and options fail before the model loads
        check_transform_options(name, registry.get("transform", name), options)
    original = load_model(model, dtype=args.dtype, quantized=args.quantized)
    if args.adapter:
        original = apply_adapter(original, Path(args.adapter), registry)
    stages = {"original": original}
    result = original
    for name, options in specs:
        result = apply_transforms(result, [(name, options)], registry)
        stages[f"+{name}"] = result
        if name == "collapse":
            print(format_report(collapse_report(original.model, result.model)))
    out = save_model(result, args.out)
    print(f"saved {out} ({len(result.model.layers)} blocks); load it with Engine(model={str(out)!r}) or mlx_lm.load")
    if args.report:
        # held-out: the teacher's answers to built-in prompts heal never trains on
        heldout = teacher_texts(original, heldout_prompts(16), 96, seed=1)
        print(format_heal_report(heal_report(original, stages, heldout)))
    return 0
