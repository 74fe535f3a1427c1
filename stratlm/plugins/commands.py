"""Built-in `stratlm` subcommands, registered through the `stratlm` entry-point group like a
third-party package's would be. A command is an object (here: a module) with add_parser(sub)
that sets `run` (args -> exit code) on the parser it adds."""

from stratlm.cli import bench, chat, convert, generate, info, plugins, serve, train, transform
from stratlm.core.hookspecs import hookimpl

COMMANDS = {"generate": generate, "chat": chat, "serve": serve, "plugins": plugins, "info": info, "train": train, "transform": transform, "bench": bench, "convert": convert}


@hookimpl
def register_commands(register):
    for name, command in COMMANDS.items():
        register(name, command)
