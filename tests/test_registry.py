"""The plugin registry: built-ins come through entry points like any plugin; errors name names."""

import sys

import pytest

from stratlm.core.errors import DuplicateNameError, UnknownNameError
from stratlm.core.hookspecs import hookimpl
from stratlm.core.registry import Registry, get_registry
from stratlm.testing import write_plugin_distribution


def test_builtins_register_through_the_entry_point_group():
    registry = Registry()
    assert {"llama", "qwen3"} <= set(registry.names("model family"))
    assert {"greedy", "sample"} <= set(registry.names("strategy"))
    assert registry.table("model family")["llama"].origin == "stratlm"
    assert registry.get("model alias", "qwen3-0.6b") == "Qwen/Qwen3-0.6B"


def test_every_familys_aliases_resolve_to_its_hub_checkpoints():
    """Each family's ALIASES are registered and resolve (without a download) to the hub loader
    and the checkpoint's repo id; no alias is taken twice."""
    from stratlm.loaders.loading import DEFAULT_ALIAS, resolve
    from stratlm.plugins.models import FAMILIES

    registry = Registry()
    assert {module.FAMILY.name for module in FAMILIES} <= set(registry.names("model family"))
    seen: set = set()
    for module in FAMILIES:
        assert module.ALIASES, module.__name__
        for alias, repo in module.ALIASES.items():
            assert alias not in seen
            seen.add(alias)
            assert registry.get("model alias", alias) == repo
            if alias != DEFAULT_ALIAS:  # (the default stands for the embedded GGUF when installed)
                assert resolve(alias, registry) == ("hub", repo), alias
            assert repo.count("/") == 1, repo


def test_unknown_name_lists_known_ones_and_suggests_the_closest():
    with pytest.raises(UnknownNameError) as err:
        get_registry().get("strategy", "gredy")
    message = str(err.value)
    assert "unknown strategy 'gredy'" in message
    assert "Did you mean 'greedy'" in message
    assert "Known strategies:" in message and "sample" in message


class _StrategyPlugin:
    def __init__(self, name):
        self.name = name

    @hookimpl
    def register_strategies(self, register):
        from stratlm.strategies.single import SingleSequence

        register(self.name, SingleSequence)


def test_duplicate_names_are_an_error_naming_both_origins_and_only_for_that_name():
    registry = Registry(load_entry_points=False)
    registry.add_plugin(_StrategyPlugin("twin"), origin="package-a")
    registry.add_plugin(_StrategyPlugin("twin"), origin="package-b")
    registry.add_plugin(_StrategyPlugin("single"), origin="package-c")
    with pytest.raises(DuplicateNameError) as err:
        registry.get("strategy", "twin")
    assert "package-a" in str(err.value) and "package-b" in str(err.value) and "'twin'" in str(err.value)
    assert registry.names("strategy") == ["single", "twin"] and registry.get("strategy", "single") is not None  # the rest works
    assert list(registry.conflicts) == [("strategy", "twin")]


def test_a_plugin_that_fails_to_import_is_skipped_and_reported(tmp_path, monkeypatch, capsys):
    write_plugin_distribution(
        tmp_path,
        "broken-plugin",
        modules={"broken_stratlm_plugin": "raise ImportError('needs a package that is not installed')\n"},
        entry_points={"broken": "broken_stratlm_plugin"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    assert "broken-plugin:broken" in registry.failed
    assert "needs a package that is not installed" in registry.failed["broken-plugin:broken"]
    assert "greedy" in registry.names("strategy")  # the engine keeps working
    assert "plugin failed to load" in capsys.readouterr().err


def test_a_third_party_model_alias_is_found_with_its_package(tmp_path, monkeypatch):
    source = (
        "from stratlm.core.hookspecs import hookimpl\n"
        "@hookimpl\n"
        "def register_model_aliases(register):\n"
        "    register('my-tiny', '/models/my-tiny')\n"
    )
    write_plugin_distribution(tmp_path, "stratlm-mytiny", {"stratlm_mytiny": source}, {"mytiny": "stratlm_mytiny"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    entry = registry.table("model alias")["my-tiny"]
    assert entry.obj == "/models/my-tiny" and entry.origin == "stratlm-mytiny"
    sys.modules.pop("stratlm_mytiny", None)


class _ScorerPlugin:
    @hookimpl
    def register_scorers(self, register):
        register("shortest", lambda result: -len(result.token_ids))


def test_strategies_look_up_named_options_in_the_engines_registry():
    from stratlm import Engine
    from stratlm.testing import tiny_model

    registry = Registry()  # the built-ins, plus a scorer the process-wide registry does not have
    registry.add_plugin(_ScorerPlugin(), origin="test-scorers")
    engine = Engine(tiny_model("llama", seed=4), strategy="best-of-n", registry=registry, n=3, scorer="shortest")
    result = engine.generate("hi", max_tokens=6, temperature=1.0, seed=0)
    scores = [c["score"] for c in result.extra["candidates"]]
    assert scores == [-c["tokens"] for c in result.extra["candidates"]]  # our scorer ranked them
    assert len(result.token_ids) == min(c["tokens"] for c in result.extra["candidates"])
    with pytest.raises(UnknownNameError, match="unknown scorer 'shortest'"):
        Engine(engine.loaded, strategy="best-of-n", scorer="shortest")  # not in the default registry
