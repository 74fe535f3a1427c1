"""Errors a user can act on. The CLI prints them as one line; nothing else is caught."""

from __future__ import annotations

import difflib


class StratlmError(Exception):
    """Base class: the message names what was wrong and what would be right."""


class ConfigError(StratlmError, ValueError):
    """An option or parameter has a value it cannot take."""


class ModelLoadError(StratlmError):
    """A model source is missing, corrupt or of an unsupported kind."""


class UnknownNameError(StratlmError, KeyError):
    """A name (model, strategy, transform, ...) is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(self.known) if self.known else "none registered"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {plural(kind)}: {listing}.")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def plural(noun: str) -> str:
    if noun.endswith("y"):
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith("s") else "s")


class DuplicateNameError(StratlmError):
    """Two plugins registered the same name for the same kind."""


class QueueFullError(StratlmError):
    """The scheduler's waiting queue is full: the caller should retry later (HTTP 429/503)."""

    def __init__(self, waiting: int, limit: int):
        self.waiting, self.limit = waiting, limit
        super().__init__(f"the request queue is full ({waiting} waiting, limit {limit}); retry later or raise the scheduler's max_queue")


class DistributedError(StratlmError):
    """A process of a model's process group is gone, or the group could not be formed (stratlm.distributed)."""


class RequestFailedError(StratlmError):
    """A request ended with an error inside the engine (the message names it); other requests go on."""
