"""The `stratlm` command. Each subcommand lives in its own module with add_parser(sub) and run(args)."""

from __future__ import annotations

import argparse
import importlib
import sys

import stratlm  # noqa: F401  (loads the optimized BLAS before mlx.core)
from stratlm.core.errors import StratlmError
from stratlm.core.log import configure

#: subcommand modules under stratlm.cli
COMMANDS = ("generate", "chat", "plugins", "info", "train", "transform", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stratlm", description="A plugin-based LLM inference engine on MLX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stratlm.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(verbose=args.verbose)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except StratlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless -v asks for the traceback
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run `stratlm -v ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
