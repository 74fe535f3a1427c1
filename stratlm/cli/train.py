"""stratlm train: DoRA fine-tuning (`train dora --data FILE.jsonl`) and the text->SVG demo (`train svg`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stratlm.core.errors import ConfigError

from .common import add_model_options, box, jsonable


def add_training_options(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", default="adapters", help="adapter folder: adapters.safetensors, adapter_config.json, checkpoints (default: adapters)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from the last checkpoint in --out (same data, model and settings)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its checkpoints and adapter) instead of refusing")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", "--lr", type=float, default=lr)
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up before the cosine decay (default: steps/10)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--max-length", type=int, default=1024, help="longer examples are cut")
    g.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between validation losses (0: only at the end)")
    g.add_argument("--report-every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("adapter")
    a.add_argument("--rank", type=int, default=8)
    a.add_argument("--scale", type=float, default=20.0, help="the low-rank update's scale (mlx-lm's name)")
    a.add_argument("--dropout", type=float, default=0.0)
    a.add_argument("--num-layers", type=int, default=-1, help="adapt the last N blocks (-1: all)")
    a.add_argument("--targets", default=None, help="comma-separated layers inside a block, e.g. q_proj,v_proj (default: every projection)")
    a.add_argument("--lora", action="store_true", help="plain LoRA instead of DoRA")
    a.add_argument("--fuse-to", default=None, metavar="DIR", help="also save the model with the adapter merged in, as an ordinary model folder")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune DoRA adapters (mlx-lm compatible)")
    tsub = p.add_subparsers(dest="train_command", metavar="KIND")
    d = tsub.add_parser("dora", help="fine-tune on a JSONL dataset",
                        description="JSONL lines: {\"prompt\",\"completion\"}, {\"messages\": [...]} or {\"text\"}.")
    add_model_options(d)
    d.add_argument("--data", required=True, help="training data, .jsonl")
    d.add_argument("--valid", default=None, help="validation data, .jsonl (default: --valid-fraction of --data)")
    d.add_argument("--valid-fraction", type=float, default=0.1, help="held out of --data when --valid is not given (0: no validation)")
    d.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not only completions / assistant turns")
    d.add_argument("--stop-on-bad-lines", action="store_true", help="stop at the first bad dataset line (default: skip it with a warning)")
    add_training_options(d, steps=200, lr=1e-4)
    d.set_defaults(run=run_dora)
    s = tsub.add_parser("svg", help="the text->SVG demo: make the data, evaluate, fine-tune, evaluate again")
    add_model_options(s)
    s.add_argument("--heldout", type=int, default=64, help="held-out descriptions")
    s.add_argument("--data-only", action="store_true", help="only write train.jsonl / heldout.jsonl into --out/data")
    add_training_options(s, steps=120, lr=1e-4)
    s.set_defaults(run=run_svg)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def configs(args: argparse.Namespace):
    from stratlm.transforms.dora import AdapterConfig
    from stratlm.training.trainer import TrainConfig

    adapter = AdapterConfig(rank=args.rank, scale=args.scale, dropout=args.dropout, num_layers=args.num_layers,
                            keys=args.targets.split(",") if args.targets else None, fine_tune_type="lora" if args.lora else "dora")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(0, args.steps // 10)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation, learning_rate=args.learning_rate,
                        warmup_steps=min(warmup, args.steps - 1), weight_decay=args.weight_decay, seed=args.seed, checkpoint_every=args.checkpoint_every,
                        eval_every=args.eval_every, report_every=args.report_every, max_length=args.max_length)
    return adapter, train


def load(args: argparse.Namespace):
    from stratlm.engine import apply_adapter, apply_transforms
    from stratlm.loaders.loading import load_model
    from stratlm.core.registry import get_registry

    from .common import parse_transforms

    registry = getattr(args, "registry", None) or get_registry()
    loaded = load_model(args.model, dtype=args.dtype, quantized=args.quantized, registry=registry)
    if args.adapter:
        loaded = apply_adapter(loaded, Path(args.adapter), registry)
    return apply_transforms(loaded, parse_transforms(args.transform), registry)


def finish(result, args: argparse.Namespace) -> None:
    from stratlm.loaders.loading import save_model
    from stratlm.transforms.dora import fuse

    t = result.training
    print(f"trained steps {t.start_step}..{t.steps} on {result.train_examples} examples ({result.valid_examples} held out for validation) "
          f"in {t.seconds:.0f} s: loss {t.loss:.4f}" + (f", validation loss {t.val_loss:.4f}" if t.val_loss is not None else ""))
    print(f"adapter: {result.adapter_path}  (Engine(model=..., adapter={str(result.adapter_path)!r}), or mlx_lm.load(..., adapter_path=...))")
    if args.fuse_to:
        from stratlm.training.trainer import write_error

        try:
            save_model(fuse(result.loaded), args.fuse_to)
        except OSError as exc:
            raise write_error(Path(exc.filename) if exc.filename else Path(args.fuse_to), exc, lost=f"the adapter itself is saved in {result.adapter_path}") from exc
        print(f"fused model: {args.fuse_to}")


def run_dora(args: argparse.Namespace) -> int:
    from stratlm.training.finetune import finetune

    adapter, train = configs(args)
    loaded = load(args)
    result = finetune(loaded, args.data, valid=args.valid, valid_fraction=0 if args.valid else args.valid_fraction, adapter=adapter, train=train,
                      out=args.out, resume=args.resume, overwrite=args.overwrite, train_on_prompt=args.train_on_prompt,
                      on_error="stop" if args.stop_on_bad_lines else "skip")
    finish(result, args)
    return 0


def run_svg(args: argparse.Namespace) -> int:
    from stratlm.training import svg_task
    from stratlm.training.data import write_jsonl
    from stratlm.transforms.dora import fuse
    from stratlm.training.finetune import finetune

    if args.heldout < 1:
        raise ConfigError(f"--heldout must be >= 1, got {args.heldout}")
    out = Path(args.out)
    from stratlm.training.trainer import prepare_out

    prepare_out(out, resume=args.resume, overwrite=args.overwrite)  # before the data and the "before" score are written
    train_specs, heldout_specs = svg_task.make_splits(args.heldout, args.seed)
    data = write_jsonl(svg_task.records(train_specs), out / "data" / "train.jsonl")
    write_jsonl(svg_task.records(heldout_specs), out / "data" / "heldout.jsonl")
    print(f"data: {len(train_specs)} training and {len(heldout_specs)} held-out descriptions in {out / 'data'}")
    if args.data_only:
        return 0
    adapter, train = configs(args)
    loaded = load(args)
    before_file = out / "svg_before.json"
    if args.resume and before_file.exists():  # measured by the interrupted run
        before = svg_task.SvgScore(**json.loads(before_file.read_text()))
    else:
        before = svg_task.evaluate_svg(loaded, heldout_specs)
        before_file.write_text(json.dumps(jsonable(before)))
    box("held-out, before", before.line())
    result = finetune(loaded, data, valid_fraction=0.05, adapter=adapter, train=train, out=out, resume=args.resume, overwrite=args.overwrite)
    finish(result, args)
    after = svg_task.evaluate_svg(fuse(result.loaded), heldout_specs)
    box("held-out, after", after.line() + "\n" + "\n".join(f"{d} -> {a}" for d, a in after.examples))
    report = {"before": before, "after": after, "training": result.training}
    (out / "svg_report.json").write_text(json.dumps(jsonable(report), indent=1))
    return 0
