"""Every extension point of stratlm, in one place.

A plugin is a plain module with functions decorated by `hookimpl`, named after these
specs, registered through the `stratlm` entry-point group. Each hook receives a
`register(name, obj)` callable.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "stratlm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_model_families(register: Register) -> None:
    """register(family: ModelFamily) - a model architecture and how to build it."""


@hookspec
def register_model_aliases(register: Register) -> None:
    """register(alias: str, source: str) - a short name for a hub repo id, folder or file."""


@hookspec
def register_strategies(register: Register) -> None:
    """register(name: str, strategy_class) - a decoding strategy (a core.Strategy subclass)."""


@hookspec
def register_transforms(register: Register) -> None:
    """register(name: str, transform) - a callable (LoadedModel, **options) -> LoadedModel."""


@hookspec
def register_scorers(register: Register) -> None:
    """register(name: str, scorer) - ranks candidate completions (best-of-n)."""


@hookspec
def register_answer_extractors(register: Register) -> None:
    """register(name: str, extractor) - maps a completion's text to an answer (majority vote)."""


@hookspec
def register_draft_sources(register: Register) -> None:
    """register(name: str, factory) - makes a draft for speculative decoding from a spec."""


@hookspec
def register_loaders(register: Register) -> None:
    """register(loader: core.Loader) - reads one kind of model source (a folder, a .gguf file, ...)."""


@hookspec
def register_logits_processors(register: Register) -> None:
    """register(name: str, factory) - factory(SamplingParams) -> a processor (history, logits) -> logits,
    or None when the parameters do not ask for it; every strategy's sampler applies them in order."""


@hookspec
def register_commands(register: Register) -> None:
    """register(name: str, command) - a `stratlm` subcommand: an object with add_parser(subparsers)
    that sets `run` (args -> exit code) on its parser."""


@hookspec(firstresult=True)
def load_adapter(loaded, path):
    """Return `loaded` with the adapter in folder `path` applied, or None if this plugin does not read that kind."""
