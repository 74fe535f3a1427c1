"""stratlm bench: stratlm and mlx-lm side by side on the same model, prompt and token count."""

from __future__ import annotations

import argparse
import sys

from stratlm.specs import parse_options


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark stratlm against mlx-lm (prefill, decode, peak memory, ratios)",
        description="Greedy decoding with EOS ignored, so every engine generates the same number of tokens. "
        "mlx-lm runs in this process (same BLAS) and, on the CPU, in subprocesses with MLX's bundled BLAS "
        "(as a user installs it) and with plain OpenBLAS. Needs the `bench` extra (mlx-lm).",
    )
    p.add_argument("-m", "--model", default=None, help="smollm2-135m (default, the embedded model), "
                   "qwen3-0.6b-random (the real Qwen3-0.6B shape, random weights), or any model source")
    p.add_argument("-s", "--strategy", default="greedy", help="stratlm strategy to time (others than greedy/batch are also compared with stratlm greedy)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="a strategy option (repeatable)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (greedy becomes the batch strategy)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--prompt", default=None, help="text the prompt is cut from (default: a short passage, repeated)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (each engine once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine first")
    p.add_argument("--baselines", default="all", help="comma-separated: all (mlx-lm here and, on the CPU, in subprocesses), same-process "
                   "(mlx-lm here), none, llama.cpp (llama-cpp-python on the same .gguf, 1 and 2 threads; needs the bench extra built from source)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stratlm.bench import BenchConfig, format_report, run_bench

    config = BenchConfig(
        model=args.model, strategy=args.strategy, batch=args.batch, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
        dtype=args.dtype, reps=args.reps, warmup=args.warmup, baselines=args.baselines, options=parse_options(args.option), prompt=args.prompt,
    )
    progress = (lambda _: None) if args.json else (lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    report = run_bench(config, progress)
    print(report.to_json() if args.json else format_report(report))
    return 0
