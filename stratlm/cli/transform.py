"""stratlm transform [MODEL] NAME[:k=v,...] ... --out DIR: apply transforms in order and save the result."""

from __future__ import annotations

import argparse

from stratlm.core.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("transform", help="apply transforms (collapse, heal, fuse, ...) and save an ordinary model folder",
                       description="Example: stratlm transform smollm2-135m collapse:n=6 heal --out smollm2-collapsed")
    p.add_argument("items", nargs="+", metavar="[MODEL] TRANSFORM", help="an optional model source, then transform names with options, e.g. collapse:n=6,mode=drop")
    p.add_argument("--out", required=True, help="folder for the transformed model (config.json, model.safetensors, tokenizer)")
    p.add_argument("--adapter", default=None, help="apply this adapter folder before the transforms")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantized", choices=("keep", "dequantize"), default=None)
    p.add_argument("--report", action="store_true", help="also measure KL to the original, top-1 agreement and perplexity on held-out teacher text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stratlm.core.engine import apply_adapter, apply_transforms
    from stratlm.core.loading import load_model, save_model
    from stratlm.core.registry import get_registry
    from stratlm.transforms.collapse import collapse_report, format_report, origin_of
    from stratlm.transforms.heal import format_heal_report, heal_report, self_distillation_data

    from .common import parse_transforms

    registry = get_registry()
    known = set(registry.names("transform"))
    items = list(args.items)
    model = None if items[0].partition(":")[0] in known else items.pop(0)
    if not items:
        raise ConfigError(f"name at least one transform after the model; known transforms: {', '.join(sorted(known))}")
    specs = parse_transforms(items)
    for name, _ in specs:
        registry.get("transform", name)  # unknown names fail before the model loads
    original = load_model(model, dtype=args.dtype, quantized=args.quantized)
    if args.adapter:
        from pathlib import Path

        original = apply_adapter(original, Path(args.adapter), registry)
    result = original
    for spec in specs:
        result = apply_transforms(result, [spec], registry)
        if spec[0] == "collapse":
            print(format_report(collapse_report(original.model, result.model)))
    out = save_model(result, args.out)
    print(f"saved {out} ({len(result.model.layers)} blocks); load it with Engine(model={str(out)!r}) or mlx_lm.load")
    if args.report:
        _, heldout = self_distillation_data(original, 0, 16, 96, seed=1234)
        models = {"original": original}
        origin = origin_of(result.model)
        if origin is not None and origin.teacher is not original:
            models["input"] = origin.teacher
        models["result"] = result
        print(format_heal_report(heal_report(original, models, heldout)))
    return 0
