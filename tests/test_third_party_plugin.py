"""A strategy from a separate distribution: an entry point in a temporary dist-info on sys.path
is found by name by a fresh Registry and runs through the Engine."""

from __future__ import annotations

import sys
import textwrap

from stratlm.engine import Engine
from stratlm.core.registry import Registry

PLUGIN = '''
"""A third-party plugin: a strategy that decodes greedily and reports the text reversed."""
import attrs

from stratlm.decoding.loop import run_single
from stratlm.core.hookspecs import hookimpl
from stratlm.core.strategy import Strategy


class Mirror(Strategy):
    name = "mirror"
    options = ("suffix",)

    def __init__(self, target, suffix="", **options):
        super().__init__(target, **options)
        self.suffix = suffix

    def generate(self, prompts, params):
        t = self.target
        results = [list(run_single(t.model, t.tokenizer, t.eos_token_ids, p, params))[-1] for p in prompts]
        return [attrs.evolve(r, text=r.text[::-1] + self.suffix, extra={"plugin": "mirror"}) for r in results]


@hookimpl
def register_strategies(register):
    register(Mirror.name, Mirror)


@hookimpl
def register_answer_extractors(register):
    register("first_word", lambda text: text.split()[0] if text.split() else None)
'''


def test_strategy_from_a_separate_distribution_is_found_by_name_and_runs(tmp_path, monkeypatch, tiny):
    (tmp_path / "stratlm_mirror_plugin.py").write_text(PLUGIN)
    dist_info = tmp_path / "stratlm_mirror-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: stratlm-mirror\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent("""\
        [stratlm]
        mirror = stratlm_mirror_plugin
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stratlm_mirror_plugin", raising=False)

    registry = Registry()
    assert registry.failed == {}
    assert "mirror" in registry.names("strategy") and "batch" in registry.names("strategy")  # built-ins still there
    assert registry.table("strategy")["mirror"].origin == "stratlm-mirror"
    assert registry.get("answer extractor", "first_word")("forty two") == "forty"

    engine = Engine(tiny, "mirror", registry=registry, suffix="!")
    result = engine.generate("hello", chat_template=False, max_tokens=6)
    greedy = Engine(tiny, "greedy", registry=registry).generate("hello", chat_template=False, max_tokens=6)
    assert result.text == greedy.text[::-1] + "!"
    assert result.extra == {"plugin": "mirror"}
