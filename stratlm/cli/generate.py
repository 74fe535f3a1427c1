"""stratlm generate: one prompt streamed in boxes, several prompts together, or --json."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_generation_options, add_model_options, add_parallel_option, benchmark_lines, box, box_bottom, box_top, engine_from_args, generation_kwargs, result_json


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts", description="Generate text. PROMPT '-' reads it from standard input.")
    p.add_argument("prompt", nargs="*", help="the prompt(s); several prompts are decoded together by the strategy")
    add_model_options(p)
    add_parallel_option(p)
    add_generation_options(p)
    p.add_argument("--logprobs", action="store_true", help="report each generated token's log-probability (with --json)")
    p.add_argument("--json", action="store_true", help="print the result(s) as JSON instead of boxes")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    p.set_defaults(run=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    from stratlm.core.errors import ConfigError

    from stratlm.engine import check_text

    prompts = [read_stdin() if p == "-" else check_text(p, "the prompt") for p in args.prompt]
    if not prompts:
        raise ConfigError("no prompt given: stratlm generate \"Your prompt\" (or '-' to read standard input)")
    if any(not p.strip() for p in prompts):
        raise ConfigError("a prompt is empty; give some text")
    return prompts


def read_stdin() -> str:
    """Standard input as UTF-8 text; other bytes are an error naming the first bad one."""
    from stratlm.core.errors import ConfigError

    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (tests, notebooks)
        return sys.stdin.read()
    raw = buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"standard input is not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); give UTF-8 text") from exc


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    kwargs = generation_kwargs(args)
    engine = engine_from_args(args)
    if args.json or len(prompts) > 1:
        results = engine.generate(prompts if len(prompts) > 1 else prompts[0], logprobs=args.logprobs, **kwargs)
        results = results if isinstance(results, list) else [results]
        if args.json:
            payload = [result_json(r) for r in results]
            print(json.dumps(payload if len(prompts) > 1 else payload[0], ensure_ascii=False, indent=2))
        elif args.quiet:
            print("\n".join(r.text for r in results))
        else:
            for i, r in enumerate(results):
                box(f"Inp {i:05d}", r.prompt)
                box(f"Out {i:05d}", r.text)
            total = sum(r.stats.generation_tokens for r in results)
            wall = max(r.stats.prompt_time + r.stats.generation_time for r in results)
            summary = f"{len(results)} prompts, {total} tokens generated in {wall:.2f}s: {total / wall if wall else 0:.1f} tokens/sec in all\n"
            box("Benchmark", summary + benchmark_lines(results[-1].stats))
        return 0
    if args.quiet:
        for piece in engine.stream(prompts[0], **kwargs):
            print(piece, end="", flush=True)
        print()
        return 0
    text, _ = engine.render(prompts[0], chat_template=kwargs["chat_template"], chat_template_kwargs=kwargs["chat_template_kwargs"], system=kwargs["system"])
    box("Inp 00000", text)
    box_top("Out 00000")
    for piece in engine.stream(prompts[0], **kwargs):
        print(piece, end="", flush=True)
    print()
    box_bottom()
    result = engine.last_result
    extra = "".join(f"\n{k}: {v}" for k, v in result.extra.items() if isinstance(v, (int, float, str)))
    box("Benchmark", benchmark_lines(result.stats) + f"\nFinish reason:     {result.finish_reason}" + extra)
    return 0
