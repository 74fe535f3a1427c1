"""Decode speed of the embedded SmolLM2 with a DoRA/LoRA adapter: base, adapter unfused, adapter fused
at load (the default), measured side by side in interleaved rounds. Trains the adapter for a few steps first.

    PYTHONPATH=. python3 scripts/adapter_bench.py --rounds 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import stratlm  # noqa: F401  (BLAS before mlx.core)
from stratlm import Engine
from stratlm.loaders.loading import load_model
from stratlm.training.finetune import finetune
from stratlm.training.data import from_records
from stratlm.training.trainer import TrainConfig
from stratlm.transforms.dora import AdapterConfig

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kind", default="dora", choices=("dora", "lora"))
    args = ap.parse_args()
    base = load_model(None)
    records = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(8)]
    out = Path(tempfile.mkdtemp()) / "adapter"
    finetune(base, from_records(records, base.tokenizer), valid_fraction=0, adapter=AdapterConfig(rank=8, fine_tune_type=args.kind),
             train=TrainConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0), out=out, on_progress=None)
    print("adapter trained", flush=True)
    engines = {
        "base": Engine(base),
        f"{args.kind} unfused (fuse_adapter=False)": Engine(base, adapter=out, fuse_adapter=False),
        f"{args.kind} fused at load (default)": Engine(base, adapter=out),
    }
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for name, engine in engines.items():  # warm-up
        engine.generate(PROMPT, max_tokens=8, ignore_eos=True)
    for r in range(args.rounds):
        names = list(engines)
        names = names[r % len(names):] + names[: r % len(names)]  # rotate the order
        for name in names:
            result = engines[name].generate(PROMPT, max_tokens=args.max_tokens, ignore_eos=True)
            speeds[name].append(result.stats.generation_tps)
            print(f"round {r}: {name}: {result.stats.generation_tps:.2f} tok/s", flush=True)
    print("| engine | decode tok/s, median (min-max) | vs base, per round: median (min-max) |")
    print("| --- | --- | --- |")
    for name, values in speeds.items():
        ratios = [v / b for v, b in zip(values, speeds["base"])]  # each round's runs were side by side
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
              f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) |")


if __name__ == "__main__":
    main()
