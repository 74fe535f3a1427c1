"""The plugin registry: a pluggy PluginManager fed by the `stratlm` entry-point group.

Names live in one table per kind (model family, alias, strategy, ...). A plugin that fails
to import, or whose registration hook raises, is logged, skipped and listed in `failed`; the
same name registered twice is an error naming both origins when that name is used (other names
keep working); an unknown name is an error listing the known ones.
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
        self.failed: dict[str, str] = {}  # plugin -> why it was skipped (failed to import, a hook raised)
        self.conflicts: dict[tuple[str, str], DuplicateNameError] = {}  # (kind, name) registered by two packages
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
        # per plugin first: a plugin whose hook raises is named, skipped (all of its hooks) and the rest keep working
        gathered: list[tuple[str, Any, str, list[tuple[str, Any]]]] = []  # (kind, plugin, origin, [(name, obj)])
        broken: dict[int, Any] = {}
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                origin = self._origins.get(id(impl.plugin), impl.plugin_name)
                found: list[tuple[str, Any]] = []

                def register(name_or_obj: Any, obj: Any = None, *, _found=found) -> None:
                    # families and loaders register themselves (they carry their name); others register(name, obj)
                    _found.append((name_or_obj.name, name_or_obj) if obj is None else (name_or_obj, obj))

                try:
                    impl.function(register=register)
                except Exception as exc:  # a plugin's bug must not break the engine
                    label = origin if impl.plugin_name.isdigit() else impl.plugin_name  # pluggy names anonymous plugins by id
                    self.failed[label] = f"{hook_name} raised {type(exc).__name__}: {exc} (package {origin}; the plugin is skipped)"
                    log.warning("plugin hook failed; skipped", plugin=label, package=origin, hook=hook_name, error=f"{type(exc).__name__}: {exc}")
                    broken[id(impl.plugin)] = impl.plugin
                    continue
                gathered.append((kind, impl.plugin, origin, found))
        for plugin in broken.values():
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)  # its other hooks (load_adapter, ...) are not called either
        tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.conflicts = {}
        for kind, plugin, origin, found in gathered:
            if id(plugin) in broken:
                continue
            table = tables[kind]
            for name, value in found:
                if name in table:
                    # both stay out of use for this name only: every other name (and command) keeps working
                    self.conflicts[(kind, name)] = DuplicateNameError(
                        f"{kind} {name!r} is registered twice: by {table[name].origin} and by {origin}; "
                        "uninstall one of the packages or rename one")
                    log.warning("name registered twice", kind=kind, name=name, packages=[table[name].origin, origin])
                    continue
                table[name] = Entry(name, value, origin)
        return tables

    def table(self, kind: str) -> dict[str, Entry]:
        if self._tables is None:
            self._tables = self._build()
        return self._tables[kind]

    def get(self, kind: str, name: str) -> Any:
        table = self.table(kind)
        if (kind, name) in self.conflicts:
            raise self.conflicts[(kind, name)]
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
