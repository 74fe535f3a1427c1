"""An example stratlm plugin: the `shortest-of-n` strategy, the `yes_no` answer extractor
and the `smol` alias.

    pip install -e examples/stratlm-example
    stratlm plugins                      # lists them with the package "stratlm-example"
    stratlm generate "Name a colour." -s shortest-of-n -o n=3
"""

from __future__ import annotations

import re

import attrs

from stratlm.core.errors import ConfigError
from stratlm.decoding.loop import run_single
from stratlm.core.hookspecs import hookimpl
from stratlm.core.strategy import Strategy


class ShortestOfN(Strategy):
    """Sample n completions one after another; keep the shortest (others in extra["candidates"])."""

    name = "shortest-of-n"
    options = ("n",)
    default_temperature = 0.8

    def __init__(self, target, n: int = 3, **options):
        super().__init__(target, **options)  # checks unknown options; takes the Engine's registry
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an integer >= 1, got {n!r}")
        self.n = n

    def generate(self, prompts, params):
        return [self._one(p, params) for p in prompts]

    def _one(self, prompt, params):
        t = self.target
        seed = params.sampling.seed
        candidates = []
        for i in range(self.n):
            sampling = attrs.evolve(params.sampling, seed=None if seed is None else seed + i)
            run = run_single(t.model, t.tokenizer, t.eos_token_ids, prompt, attrs.evolve(params, sampling=sampling))
            candidates.append(list(run)[-1])
        best = min(candidates, key=lambda r: len(r.token_ids))
        return attrs.evolve(best, extra={"candidates": [{"text": c.text, "tokens": len(c.token_ids)} for c in candidates]})


def yes_no(text: str) -> str | None:
    """The first 'yes' or 'no' in the text, lower-cased."""
    match = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return match.group(1).lower() if match else None


@hookimpl
def register_strategies(register):
    register(ShortestOfN.name, ShortestOfN)


@hookimpl
def register_answer_extractors(register):
    register("yes_no", yes_no)


@hookimpl
def register_model_aliases(register):
    register("smol", "HuggingFaceTB/SmolLM2-135M-Instruct")
