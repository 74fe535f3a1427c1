"""What several subcommands share: model/strategy/sampling options, and the boxed output."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Any

from stratlm.specs import parse_options, parse_transform_specs
from stratlm.core.errors import ConfigError

BOX_WIDTH = 73


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None, help="alias, hub repo id, folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--adapter", default=None, help="adapter folder (adapters.safetensors + adapter_config.json)")
    g.add_argument("--no-fuse-adapter", action="store_true", help="keep the adapter as separate layers "
                   "(default: merged into the weights at load; unmerged decodes many times slower)")
    g.add_argument("-t", "--transform", action="append", default=[], metavar="NAME[:k=v,...]", help="apply a transform by name (repeatable, in order)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--quantized", choices=("keep", "dequantize"), default=None,
                   help="run quantized weights as such, or expand them to --dtype (default: keep, on stratlm's CPU kernels "
                   "or the GPU; dequantize only where the CPU kernels cannot be built)")


def add_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", choices=("tensor", "pipeline"), default=None,
                   help="split the model over the processes started by `mlx.launch -n N` (see docs/distributed.md); rank 0 prints")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("-s", "--strategy", default="greedy", help="decoding strategy by name (see `stratlm plugins`)")
    g.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="a strategy option, e.g. -o n=4 -o draft=lookup (repeatable)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the strategy's)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from each token already generated")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per time a token was generated")
    g.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS", help="add BIAS in [-100, 100] to a token's logit (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as plain text")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--chat-template-kwargs", default=None, metavar="JSON", help='e.g. \'{"enable_thinking": false}\'')


def parse_transforms(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Command-line transform arguments, e.g. "collapse:n=4,mode=drop" "heal" (see parse_transform_specs)."""
    return [parsed for spec in specs for parsed in parse_transform_specs(spec)]


def parse_logit_bias(specs: list[str]) -> dict[int, float]:
    """--logit-bias arguments, e.g. "2=-100" -> {2: -100.0}."""
    bias = {}
    for spec in specs:
        token, sep, value = spec.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. --logit-bias 2=-100, got {spec!r}") from None
        if not sep:
            raise ConfigError(f"--logit-bias takes TOKEN_ID=BIAS, e.g. --logit-bias 2=-100, got {spec!r}")
    return bias


def engine_from_args(args: argparse.Namespace):
    from stratlm import Engine

    return Engine(
        args.model,
        strategy=getattr(args, "strategy", "greedy"),
        transforms=parse_transforms(args.transform),
        adapter=args.adapter,
        fuse_adapter=not getattr(args, "no_fuse_adapter", False),
        dtype=args.dtype,
        quantized=args.quantized,
        parallel=getattr(args, "parallel", None),
        registry=getattr(args, "registry", None),
        **parse_options(getattr(args, "option", [])),
    )


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Engine.generate/stream keyword arguments, validated before any model is loaded."""
    from stratlm.engine import make_params

    kwargs_json = None
    if args.chat_template_kwargs:
        try:
            kwargs_json = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--chat-template-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(kwargs_json, dict):
            raise ConfigError('--chat-template-kwargs must be a JSON object, e.g. \'{"enable_thinking": false}\'')
    sampling = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=parse_logit_bias(args.logit_bias) or None,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    make_params(**sampling)
    return dict(
        **sampling,
        chat_template=False if args.no_chat_template else None,
        chat_template_kwargs=kwargs_json,
        system=args.system,
    )


# -- output a person enjoys reading ----------------------------------------------------------------
def box_top(title: str, out=None) -> None:
    out = out or sys.stdout
    width = min(BOX_WIDTH, shutil.get_terminal_size((BOX_WIDTH + 2, 20)).columns - 2)
    side = max(2, width - len(title) - 2)
    print(f"┌{'─' * (side // 2)} {title} {'─' * (side - side // 2)}┐", file=out)


def box_bottom(out=None) -> None:
    out = out or sys.stdout
    width = min(BOX_WIDTH, shutil.get_terminal_size((BOX_WIDTH + 2, 20)).columns - 2)
    print(f"└{'─' * width}┘", file=out)


def box(title: str, text: str, out=None) -> None:
    box_top(title, out)
    print(text.rstrip("\n"), file=out or sys.stdout)
    box_bottom(out)


def benchmark_lines(stats) -> str:
    return (
        f"Prompt processing: {stats.prompt_tps:8.1f} tokens/sec ({stats.prompt_tokens:4d} tokens in {stats.prompt_time:.2f}s)\n"
        f"Tokens generation: {stats.generation_tps:8.1f} tokens/sec ({stats.generation_tokens:4d} tokens in {stats.generation_time:.2f}s)\n"
        f"Peak memory:       {stats.peak_memory_gb:8.3f} GB"
    )


def result_json(result) -> dict[str, Any]:
    import attrs

    stats = result.stats
    return {
        "text": result.text,
        "prompt": result.prompt,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "logprobs": list(result.logprobs) if result.logprobs is not None else None,
        "stats": {**attrs.asdict(stats), "prompt_tps": stats.prompt_tps, "generation_tps": stats.generation_tps},
        "extra": jsonable(result.extra),
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__attrs_attrs__"):
        import attrs

        return jsonable(attrs.asdict(value))
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
