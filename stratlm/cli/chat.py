"""stratlm chat: an interactive conversation that keeps its history."""

from __future__ import annotations

import argparse
import sys

from .common import add_generation_options, add_model_options, add_parallel_option, benchmark_lines, engine_from_args, generation_kwargs

HELP = "commands: /reset clears the history, /system TEXT sets the system message, /stats toggles speed lines, /exit quits"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat interactively with a model", description="Chat with a model; the conversation history is kept. " + HELP)
    add_model_options(p)
    add_parallel_option(p)
    add_generation_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kwargs = generation_kwargs(args)
    kwargs.pop("chat_template")
    system = kwargs.pop("system")
    engine = engine_from_args(args)
    if not engine.tokenizer.has_chat_template:
        print("error: this model has no chat template; use `stratlm generate --no-chat-template` instead", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"stratlm chat with {engine.loaded.source} ({HELP})")
    history: list[dict[str, str]] = []
    show_stats = interactive
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            print(f"(system message {'set' if system else 'cleared'})")
            continue
        if text == "/stats":
            show_stats = not show_stats
            continue
        history.append({"role": "user", "content": text})
        for piece in engine.stream(history, system=system, **kwargs):
            print(piece, end="", flush=True)
        print()
        reply = engine.last_result
        history.append({"role": "assistant", "content": reply.text})
        if show_stats:
            print(f"[{benchmark_lines(reply.stats).splitlines()[1].strip()}]", file=sys.stderr)
    return 0
