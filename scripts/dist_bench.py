"""Decode speed of one process against a model split over N local processes (tensor and pipeline),
through the real command line (`stratlm generate --json`, under `mlx.launch -n N`), in interleaved
rounds so machine noise hits every variant alike.

    PYTHONPATH=. python3 scripts/dist_bench.py --rounds 3 --max-tokens 64 [--model PATH] [--batch 8]

Prints per variant the median generation tokens/s (batch: all rows' tokens over the wall time)
and prompt tokens/s, and each ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(variant: tuple[int, str | None], args: argparse.Namespace) -> tuple[float, float]:
    n, parallel = variant
    prompts = [PROMPT] if args.batch == 1 else [f"{PROMPT} Version {i}." for i in range(args.batch)]
    cli = [sys.executable, "-m", "stratlm.cli.main", "generate", *prompts, "--max-tokens", str(args.max_tokens), "--ignore-eos", "--json"]
    if args.batch > 1:
        cli += ["-s", "batch"]
    if args.model:
        cli += ["-m", args.model]
    if parallel:
        cli = [shutil.which("mlx.launch"), "-n", str(n), "--starting-port", str(free_port()), "--", *cli, "--parallel", parallel]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=1200, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed: {done.stderr[-2000:]}")
    results = json.loads(done.stdout)
    results = results if isinstance(results, list) else [results]
    stats = [r["stats"] for r in results]
    tokens = sum(s["generation_tokens"] for s in stats)
    wall = max(s["generation_time"] for s in stats)
    return tokens / wall, stats[0]["prompt_tps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2 Q4_1 GGUF)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (the batch strategy)")
    args = ap.parse_args()
    variants = [(1, None), (args.processes, "tensor"), (args.processes, "pipeline")]
    seen: dict[tuple, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]  # rotate who goes first
        for v in order:
            seen[v].append(run(v, args))
            print(f"round {r}: {v[0]} process(es) {v[1] or 'whole'}: {seen[v][-1][0]:.2f} tok/s decode, {seen[v][-1][1]:.1f} tok/s prompt", flush=True)
    base = statistics.median(t for t, _ in seen[variants[0]])
    print(f"\nbatch {args.batch}, {args.max_tokens} tokens, {args.rounds} rounds (medians)")
    for v in variants:
        decode = statistics.median(t for t, _ in seen[v])
        prompt = statistics.median(p for _, p in seen[v])
        print(f"{v[0]} process(es) {v[1] or 'whole model':>9}: decode {decode:7.2f} tok/s ({decode / base:.2f}x one process), prompt {prompt:7.1f} tok/s")


if __name__ == "__main__":
    main()
