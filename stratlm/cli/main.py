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


#: optional packages a command may need, and the extra that installs them
EXTRAS = {"mlx_lm": "bench", "llama_cpp": "bench", "torch": "test", "transformers": "test"}


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line, `error: ...` (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def version_line() -> str:
    import platform

    import mlx.core as mx

    return f"stratlm {stratlm.__version__} (mlx {mx.__version__}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="stratlm", description="A plugin-based LLM inference engine on MLX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("--version", action="version", version=version_line())
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
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in EXTRAS:
            if args.verbose:
                raise
            print(f"error: unexpected ModuleNotFoundError: {exc} (run `stratlm -v ...` for the traceback)", file=sys.stderr)
            return 1
        extra = EXTRAS[exc.name.split(".")[0]]
        print(f"error: `stratlm {args.command}` needs the package {exc.name.split('.')[0]!r}, which is not installed: pip install 'stratlm[{extra}]'", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: still one line unless -v asks for the traceback
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run `stratlm -v ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
