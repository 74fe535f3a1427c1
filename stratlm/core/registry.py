"""The plugin registry: a pluggy PluginManager fed by the `stratlm` entry-point group.

Names live in one table per kind (model family, alias, strategy, ...). A plugin that fails
to import, or whose hook raises, is logged and skipped (what that hook registered is dropped);
the same name registered twice is an error naming both origins; an unknown name is an error
listing the known ones.
"""

from __future__ import annotations

import importlib.metadata
from types import ModuleType
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import DuplicateNameError, UnknownNameError
from .log import get_logger

log = get_logger(__name__)

#: kind -> the hook that fills it
KINDS = {
    "model family": "register_model_families",
    "model alias": "register_model_aliases",
    "strategy": "register_strategies",
    "transform": "register_transforms",
    "scorer": "register_scorers",
    "answer extractor": "register_answer_extractors",
    "draft source": "register_draft_sources",
    "loader": "register_loaders",
    "logits processor": "register_logits_processors",
    "command": "register_commands",
}


@attrs.frozen
class Entry:
    name: str
    obj: Any
    origin: str  # the distribution (package) that registered it


class Registry:
    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        self._origins: dict[int, str] = {}
        self._tables: dict[str, dict[str, Entry]] | None = None
        if load_entry_points:
            self._load_entry_points()

    # -- plugins -------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            origin = ep.dist.name if ep.dist is not None else ep.value
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the engine
                self.failed[f"{origin}:{ep.name}"] = f"{type(exc).__name__}: {exc}"
                log.warning("plugin failed to load; skipped", plugin=ep.name, package=origin, error=str(exc))
                continue
            self.add_plugin(module, origin=origin, name=f"{origin}:{ep.name}")

    def add_plugin(self, plugin: ModuleType | object, origin: str = "<runtime>", name: str | None = None) -> None:
        """Register a plugin object at run time (tests, notebooks)."""
        if self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=name)
        self._origins[id(plugin)] = origin
        self._tables = None  # rebuild lazily

    # -- tables --------------------------------------------------------------------------------
    def _build(self) -> dict[str, dict[str, Entry]]:
        tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                origin = self._origins.get(id(impl.plugin), impl.plugin_name)
                staged: dict[str, Entry] = {}

                def register(name_or_obj: Any, obj: Any = None, *, _kind=kind, _origin=origin, _staged=staged) -> None:
                    # families and loaders register themselves (they carry their name); others register(name, obj)
                    name, value = (name_or_obj.name, name_or_obj) if obj is None else (name_or_obj, obj)
                    table = tables[_kind]
                    if name in table or name in _staged:
                        first = table[name].origin if name in table else _origin
                        raise DuplicateNameError(
                            f"{_kind} {name!r} is registered twice: by {first} and by {_origin}; "
                            "uninstall one of the packages or rename one"
                        )
                    _staged[name] = Entry(name, value, _origin)

                try:
                    impl.function(register=register)
                except DuplicateNameError:
                    raise
                except Exception as exc:  # a broken plugin must not break the engine
                    self.failed[impl.plugin_name] = f"{hook_name} raised {type(exc).__name__}: {exc}"
                    log.warning("plugin hook failed; skipped", plugin=impl.plugin_name, hook=hook_name, error=f"{type(exc).__name__}: {exc}")
                    continue
                tables[kind].update(staged)
        return tables

    def table(self, kind: str) -> dict[str, Entry]:
        if self._tables is None:
            self._tables = self._build()
        return self._tables[kind]

    def get(self, kind: str, name: str) -> Any:
        table = self.table(kind)
        if name not in table:
            raise UnknownNameError(kind, name, list(table))
        return table[name].obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.table(kind))


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
