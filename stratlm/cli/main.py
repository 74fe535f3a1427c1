"""The `stratlm` command. Its subcommands come from the `register_commands` hook: the built-in
ones (stratlm.plugins.commands, one module each with add_parser(sub) and run(args)) and any a
plugin adds. A plugin whose hook or add_parser raises is skipped with a one-line warning."""

from __future__ import annotations

import argparse
import sys

import stratlm  # noqa: F401  (loads the optimized BLAS before mlx.core)
from stratlm.core.errors import StratlmError
from stratlm.core.log import configure, get_logger
from stratlm.core.registry import Registry, get_registry

log = get_logger(__name__)


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


def build_parser(registry: Registry | None = None) -> argparse.ArgumentParser:
    registry = registry or get_registry()
    parser = Parser(prog="stratlm", description="A plugin-based LLM inference engine on MLX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # the built-in commands first, in their order; then the plugins'
    for entry in sorted(registry.table("command").values(), key=lambda e: e.origin != "stratlm"):
        try:
            entry.obj.add_parser(sub)
        except Exception as exc:  # one plugin's broken command must not take the others down
            sub._name_parser_map.pop(entry.name, None)
            sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != entry.name]
            log.warning("plugin command failed to set up; skipped", command=entry.name, plugin=entry.origin, error=f"{type(exc).__name__}: {exc}")
    return parser


def main(argv: list[str] | None = None, registry: Registry | None = None) -> int:
    try:
        parser = build_parser(registry)
    except StratlmError as exc:  # e.g. two packages register the same command
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else 0
    configure(verbose=args.verbose)
    args.registry = registry  # commands look names up in it (None: the process-wide registry)
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
    except BrokenPipeError:  # `stratlm ... | head`: the reader left; nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 141
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in EXTRAS:
            if args.verbose:
                raise
            print(f"error: unexpected ModuleNotFoundError: {exc} (run `stratlm -v ...` for the traceback)", file=sys.stderr)
            return 1
        extra = EXTRAS[exc.name.split(".")[0]]
        print(f"error: `stratlm {args.command}` needs the package {exc.name.split('.')[0]!r}, which is not installed: "
              f"pip install 'stratlm[{extra}]'", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is None:
            if args.verbose:
                raise
            print(f"error: unexpected {type(exc).__name__}: {exc} (run `stratlm -v ...` for the traceback)", file=sys.stderr)
            return 1
        # a file or folder the command was pointed at (or writes to) cannot be used: name it
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: still one line unless -v asks for the traceback
        if args.verbose:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run `stratlm -v ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
