"""stratlm chat: an interactive conversation that keeps its history."""

from __future__ import annotations

import argparse
import sys

from stratlm.core.errors import StratlmError

from .common import add_generation_options, add_model_options, add_parallel_option, benchmark_lines, engine_from_args, generation_kwargs

HELP = ("commands: /help lists these, /reset clears the history, /system TEXT sets the system message, /stats toggles speed lines, /exit quits; "
        "Ctrl-C stops an answer, Ctrl-D or Ctrl-C at the prompt leaves")
COMMANDS = ("/help", "/reset", "/system", "/stats", "/exit", "/quit")


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
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become a per-turn error, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    if interactive:
        print(f"stratlm chat with {engine.loaded.source} ({HELP})")
    history: list[dict[str, str]] = []
    show_stats = interactive
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave cleanly
            print()
            break
        text = line.strip()
        if not text:
            continue
        command = text.split(maxsplit=1)[0]
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            print(HELP)
            continue
        if command == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if command == "/system":
            system = text[len("/system") :].strip() or None
            print(f"(system message {'set' if system else 'cleared'})")
            continue
        if command == "/stats":
            show_stats = not show_stats
            continue
        if command.startswith("/") and command not in COMMANDS:
            print(f"error: unknown command {command}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            for piece in engine.stream(history, system=system, **kwargs):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer, keep the session
            print("\n(answer stopped)", flush=True)
            history.pop()
            continue
        except StratlmError as exc:  # e.g. the conversation outgrew the context, or the line is not UTF-8
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        print()
        reply = engine.last_result
        history.append({"role": "assistant", "content": reply.text})
        if show_stats:
            print(f"[{benchmark_lines(reply.stats).splitlines()[1].strip()}]", file=sys.stderr)
    return 0
