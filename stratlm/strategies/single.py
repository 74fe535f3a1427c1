"""One sequence at a time, the baseline every other strategy is measured against. Registered twice:
"greedy" (temperature 0 by default: argmax) and "sample" (temperature 0.7 by default); both take
every sampler option."""

from __future__ import annotations

from typing import Iterator, Sequence

from stratlm.core.strategy import RequestPolicy, Strategy
from stratlm.core.types import GenerationParams, GenerationResult
from stratlm.decoding.loop import run_single


class SingleSequence(Strategy):
    """Decode each prompt alone with the sampler as given (temperature 0: argmax)."""

    name = "greedy"
    default_temperature = 0.0

    def policy(self, prompt: Sequence[int], params: GenerationParams) -> RequestPolicy:
        return RequestPolicy(params)

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        return [list(self.stream(p, params))[-1] for p in prompts]

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> Iterator[str | GenerationResult]:
        t = self.target
        yield from run_single(t.model, t.tokenizer, t.eos_token_ids, prompt, params, registry=self.registry,
                              context_length=t.context_length)


class Sample(SingleSequence):
    """The same loop with a non-zero default temperature."""

    name = "sample"
    default_temperature = 0.7
