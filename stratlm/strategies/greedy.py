"""greedy and sample: one sequence at a time, the baseline every other strategy is measured against."""

from __future__ import annotations

from typing import Iterator, Sequence

from stratlm.core.generation import run_single
from stratlm.core.strategy import Strategy
from stratlm.core.types import GenerationParams, GenerationResult


class Greedy(Strategy):
    """Decode each prompt alone with the sampler as given (temperature 0: argmax)."""

    name = "greedy"
    default_temperature = 0.0

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        return [list(self.stream(p, params))[-1] for p in prompts]

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> Iterator[str | GenerationResult]:
        t = self.target
        yield from run_single(t.model, t.tokenizer, t.eos_token_ids, prompt, params)


class Sample(Greedy):
    """Greedy's loop with a non-zero default temperature and the sampler options."""

    name = "sample"
    default_temperature = 0.7
