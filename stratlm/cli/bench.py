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
    p.add_argument("--load", type=int, default=0, metavar="N", help="load mode: N requests (mixed prompt and output lengths around "
                   "--prompt-tokens and --max-tokens) through the scheduler, mlx-lm's BatchGenerator and a static batch")
    p.add_argument("--rate", type=float, default=0.0, help="load mode: Poisson arrivals per second (0: all at once)")
    p.add_argument("--concurrency", type=int, default=64, help="load mode: rows decoding at once (scheduler max_running, mlx-lm completion batch)")
    p.add_argument("--readers", choices=("streams", "results", "both"), default="both",
                   help="load mode: the scheduler's callers read each text stream, wait for results, or both (one run each)")
    p.add_argument("--history-tokens", type=int, default=2000, help="load mode: the chat-turn history for the prefix-cache measurement (0: skip)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.load:
        return run_load(args)
    from stratlm.bench import BenchConfig, format_report, run_bench

    config = BenchConfig(
        model=args.model, strategy=args.strategy, batch=args.batch, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
        dtype=args.dtype, reps=args.reps, warmup=args.warmup, baselines=args.baselines, options=parse_options(args.option), prompt=args.prompt,
    )
    progress = (lambda _: None) if args.json else (lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    report = run_bench(config, progress)
    print(report.to_json() if args.json else format_report(report))
    return 0


def run_load(args: argparse.Namespace) -> int:
    import json

    from stratlm.bench.load import (LoadConfig, chat_turn_ttft, format_load_report, make_workload, run_mlx_lm, run_static, run_stratlm,
                                    warmup_workload)
    from stratlm.bench.models import PASSAGE, bench_model, model_folder, prompt_tokens
    from stratlm.bench.runner import machine_info

    say = (lambda _: None) if args.json else (lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    config = LoadConfig(requests=args.load, rate=args.rate, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                        history_tokens=args.history_tokens)
    loaded = bench_model(args.model, args.dtype)
    work = make_workload(loaded, config, lambda n: prompt_tokens(loaded, n, args.prompt))
    warm = warmup_workload(work, args.concurrency)

    def measured(run) -> dict:  # a short unmeasured pass first, then the timed one
        run(warm)
        return run(work).row()

    rows = []
    say("stratlm scheduler ...")
    for readers in ("streams", "results") if args.readers == "both" else (args.readers,):
        rows.append(measured(lambda w, readers=readers: run_stratlm(loaded, w, args.concurrency, readers)))
    if args.baselines != "none":
        say("mlx-lm BatchGenerator ...")
        folder = str(model_folder(loaded, dtype=args.dtype))
        rows.append(measured(lambda w: run_mlx_lm(folder, w, args.concurrency)))
    say("stratlm static batch ...")
    rows.append(measured(lambda w: run_static(loaded, w)))
    if args.concurrency < len(work.prompts):
        say(f"stratlm static batch, waves of {args.concurrency} ...")
        rows.append(measured(lambda w: run_static(loaded, w, args.concurrency)))
    chat = None
    if args.history_tokens:
        say("second chat turn ...")
        chat = chat_turn_ttft(loaded, args.history_tokens, args.prompt or PASSAGE)
    header = (f"load: {config.requests} requests, rate {config.rate or 'all at once'}/s, prompts ~{config.prompt_tokens} tokens, "
              f"outputs ~{config.max_tokens}, concurrency {args.concurrency}, model {loaded.source}")
    if args.json:
        print(json.dumps({"config": attrs_dict(config), "machine": machine_info(), "engines": rows, "chat_turn": chat}, indent=2))
    else:
        print(format_load_report(rows, chat, header))
    return 0


def attrs_dict(value) -> dict:
    import attrs

    return attrs.asdict(value)
