"""best-of-n: n candidates sampled in one batch, each scored; the best one is the result.

A scorer maps a candidate (a GenerationResult with its token log-probabilities) to a float,
higher is better. Registered scorers: "logprob" (sum of token log-probabilities) and
"mean_logprob" (per token, so a short and a long candidate are compared fairly); any
callable works too (e.g. a reward function of `result.text`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import attrs

from stratlm.decoding.sampler import Sampler
from stratlm.core.strategy import RequestPolicy, Strategy
from stratlm.core.types import GenerationParams, GenerationResult

from .batched import batch_results, check_prompts, run_batch
from .options import int_option, plugin_option

Scorer = Callable[[GenerationResult], float]


def logprob_score(candidate: GenerationResult) -> float:
    """Sum of the candidate's token log-probabilities (favours short candidates)."""
    return float(sum(candidate.logprobs or ()))


def mean_logprob_score(candidate: GenerationResult) -> float:
    """Mean token log-probability; an empty candidate scores -inf."""
    lps = candidate.logprobs or ()
    return float(sum(lps) / len(lps)) if lps else -math.inf


SCORERS: dict[str, Scorer] = {"logprob": logprob_score, "mean_logprob": mean_logprob_score}


def sample_candidates(strategy: Strategy, prompts: Sequence[Sequence[int]], params: GenerationParams, n: int) -> list[list[GenerationResult]]:
    """n sampled completions per prompt, all decoded in one batch, with their logprobs (for scoring)."""
    check_prompts(prompts)
    with_logprobs = attrs.evolve(params, logprobs=True)
    sampler = Sampler(params.sampling, strategy.registry)
    results = batch_results(run_batch(strategy.target, prompts, with_logprobs, sampler, copies=n, stream=False), len(prompts) * n)
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


class CandidatesPolicy(RequestPolicy):
    """n rows sampled from one prefilled prompt, with their log-probabilities; `combine` (the
    strategy's choose or count) makes the one result from them."""

    def __init__(self, params: GenerationParams, n: int, combine: Callable[[list[GenerationResult], GenerationParams], GenerationResult]):
        super().__init__(attrs.evolve(params, logprobs=True), rows=n)
        self.asked, self.combine = params, combine

    def finish(self, results: list[GenerationResult]) -> GenerationResult:
        return self.combine(results, self.asked)


def without_unasked_logprobs(result: GenerationResult, params: GenerationParams) -> GenerationResult:
    return result if params.logprobs else attrs.evolve(result, logprobs=None)


class BestOfN(Strategy):
    name = "best-of-n"
    options = ("n", "scorer")
    default_temperature = 0.7

    def __init__(self, target: Any, n: int | str = 4, scorer: str | Scorer = "logprob", **options: Any):
        super().__init__(target, **options)
        self.n = int_option(self.name, "n", n)
        self.scorer_name, self.scorer = plugin_option(self.name, "scorer", scorer, "scorer", self.registry)

    def policy(self, prompt: Sequence[int], params: GenerationParams) -> RequestPolicy:
        return CandidatesPolicy(params, self.n, self.choose)

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        return [self.choose(candidates, params) for candidates in sample_candidates(self, prompts, params, self.n)]

    def choose(self, candidates: list[GenerationResult], params: GenerationParams) -> GenerationResult:
        scores = [float(self.scorer(c)) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))  # ties: the first candidate
        listing = [{"text": c.text, "score": s, "tokens": len(c.token_ids), "finish_reason": c.finish_reason} for c, s in zip(candidates, scores)]
        chosen = without_unasked_logprobs(candidates[best], params)
        return attrs.evolve(chosen, extra={**chosen.extra, "scorer": self.scorer_name, "score": scores[best], "best_index": best,
                                                     "candidates": listing, "total_tokens": sum(len(c.token_ids) for c in candidates)})
