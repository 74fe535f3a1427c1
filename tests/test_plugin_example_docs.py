"""docs/plugins.md's worked example, run as written: its module installed as a package adds a
logits processor and a loader that a fresh Registry finds and the Engine uses."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from stratlm.core.errors import ModelLoadError
from stratlm.core.registry import Registry
from stratlm.engine import Engine
from stratlm.testing import tiny_model, write_plugin_distribution

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def example_source() -> str:
    found = re.search(r"<!-- example: stratlm_extras.py -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert found, "docs/plugins.md lost its worked example"
    return found.group(1)


def test_the_documented_plugin_adds_a_loader_and_a_logits_processor(tmp_path, monkeypatch):
    without = Registry()  # before the plugin is installed
    write_plugin_distribution(tmp_path, "stratlm-extras", {"stratlm_extras": example_source()}, {"extras": "stratlm_extras"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stratlm_extras", raising=False)
    registry = Registry()
    assert registry.failed == {}
    assert registry.table("loader")["tiny"].origin == "stratlm-extras"
    assert registry.table("logits processor")["no_immediate_repeat"].origin == "stratlm-extras"

    def tokens(strategy: str, **kwargs):
        engine = Engine("tiny:qwen3:1", strategy, registry=registry)
        return engine.generate(["hi", "a longer prompt"], chat_template=False, max_tokens=24, ignore_eos=True, **kwargs)

    # a random tiny model repeats itself; sampled with the plugin, no row repeats a token at once
    prompts, kwargs = ["hi", "a longer prompt"], dict(chat_template=False, max_tokens=24, ignore_eos=True)
    plain = Engine(tiny_model("qwen3", seed=1, registry=without), "batch", registry=without).generate(prompts, temperature=0.3, seed=0, **kwargs)
    assert any(a == b for r in plain for a, b in zip(r.token_ids, r.token_ids[1:]))
    for result in tokens("batch", temperature=0.3, seed=0):
        assert all(a != b for a, b in zip(result.token_ids, result.token_ids[1:])), result.token_ids
    # greedy: the factory returns None, the output is the model's own
    greedy = Engine(tiny_model("qwen3", seed=1, registry=without), "greedy", registry=without).generate(prompts, **kwargs)
    assert [r.token_ids for r in tokens("greedy")] == [r.token_ids for r in greedy]
    with pytest.raises(ModelLoadError, match="no model family 'gpt9'"):
        Engine("tiny:gpt9", registry=registry)

