"""The base best-of-n and vote share: n candidates per prompt sampled in one batch (each prompt
prefilled once, its cache rows replicated), then one of them chosen and reported."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs

from stratlm.core.strategy import RequestPolicy, Strategy
from stratlm.core.types import GenerationParams, GenerationResult
from stratlm.decoding.sampler import Sampler

from .batched import batch_results, check_prompts, run_batch
from .options import int_option


def sample_candidates(strategy: Strategy, prompts: Sequence[Sequence[int]], params: GenerationParams, n: int) -> list[list[GenerationResult]]:
    """n sampled completions per prompt, all decoded in one batch, with their logprobs (for scoring)."""
    check_prompts(prompts)
    with_logprobs = attrs.evolve(params, logprobs=True)
    sampler = Sampler(params.sampling, strategy.registry)
    results = batch_results(run_batch(strategy.target, prompts, with_logprobs, sampler, copies=n, stream=False), len(prompts) * n)
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def without_unasked_logprobs(result: GenerationResult, params: GenerationParams) -> GenerationResult:
    return result if params.logprobs else attrs.evolve(result, logprobs=None)


class CandidatesPolicy(RequestPolicy):
    """In the scheduler: n rows sampled from one prefilled prompt, with their log-probabilities;
    `combine` (the strategy's choose) makes the one result from them."""

    def __init__(self, params: GenerationParams, n: int, combine: Callable[[list[GenerationResult], GenerationParams], GenerationResult]):
        super().__init__(attrs.evolve(params, logprobs=True), rows=n)
        self.asked, self.combine = params, combine

    def finish(self, results: list[GenerationResult]) -> GenerationResult:
        return self.combine(results, self.asked)


class Candidates(Strategy):
    """n sampled candidates per prompt; a subclass says which one is the result (`choose`)."""

    options: tuple[str, ...] = ("n",)
    default_temperature = 0.7

    def __init__(self, target: Any, n: int | str = 4, **options: Any):
        super().__init__(target, **options)
        self.n = int_option(self.name, "n", n)

    def policy(self, prompt: Sequence[int], params: GenerationParams) -> RequestPolicy:
        return CandidatesPolicy(params, self.n, self.choose)

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        return [self.choose(candidates, params) for candidates in sample_candidates(self, prompts, params, self.n)]

    def choose(self, candidates: list[GenerationResult], params: GenerationParams) -> GenerationResult:
        raise NotImplementedError
