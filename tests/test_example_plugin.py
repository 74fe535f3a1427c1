"""The example plugin package in examples/ (the one the plugin guide shows) works as documented."""

import shutil
import sys
from pathlib import Path

from stratlm import Engine
from stratlm.core.registry import Registry
from stratlm.testing import tiny_model, write_plugin_distribution

EXAMPLE = Path(__file__).parent.parent / "examples" / "stratlm-example"


def test_the_example_plugin_registers_by_entry_point_and_runs(tmp_path, monkeypatch):
    shutil.copy(EXAMPLE / "stratlm_example.py", tmp_path)
    write_plugin_distribution(tmp_path, "stratlm-example", {}, {"example": "stratlm_example"})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry = Registry()
        assert registry.table("strategy")["shortest-of-n"].origin == "stratlm-example"
        assert registry.get("answer extractor", "yes_no")("Well, Yes indeed") == "yes"
        assert registry.get("model alias", "smol") == "HuggingFaceTB/SmolLM2-135M-Instruct"

        engine = Engine(tiny_model("llama", seed=3), strategy="shortest-of-n", registry=registry, n=3)
        result = engine.generate("hi", max_tokens=6, seed=1)
        candidates = result.extra["candidates"]
        assert len(candidates) == 3
        assert len(result.token_ids) == min(c["tokens"] for c in candidates)
        assert result.text in [c["text"] for c in candidates]
    finally:
        sys.modules.pop("stratlm_example", None)
