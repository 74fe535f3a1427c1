"""best-of-n: n candidates sampled in one batch, each scored; the best one is the result.

A scorer maps a candidate (a GenerationResult with its token log-probabilities) to a float,
higher is better. Registered scorers: "logprob" (sum of token log-probabilities) and
"mean_logprob" (per token, so a short and a long candidate are compared fairly); any
callable works too (e.g. a reward function of `result.text`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import attrs

from stratlm.core.types import GenerationParams, GenerationResult

from .candidates import Candidates, without_unasked_logprobs
from .options import plugin_option

Scorer = Callable[[GenerationResult], float]


def logprob_score(candidate: GenerationResult) -> float:
    """Sum of the candidate's token log-probabilities (favours short candidates)."""
    return float(sum(candidate.logprobs or ()))


def mean_logprob_score(candidate: GenerationResult) -> float:
    """Mean token log-probability; an empty candidate scores -inf."""
    lps = candidate.logprobs or ()
    return float(sum(lps) / len(lps)) if lps else -math.inf


SCORERS: dict[str, Scorer] = {"logprob": logprob_score, "mean_logprob": mean_logprob_score}


class BestOfN(Candidates):
    """n sampled candidates per prompt; the one the scorer rates highest is the result."""

    name = "best-of-n"
    options = ("n", "scorer")

    def __init__(self, target: Any, n: int | str = 4, scorer: str | Scorer = "logprob", **options: Any):
        super().__init__(target, n, **options)
        self.scorer_name, self.scorer = plugin_option(self.name, "scorer", scorer, "scorer", self.registry)

    def choose(self, candidates: list[GenerationResult], params: GenerationParams) -> GenerationResult:
        scores = [float(self.scorer(c)) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))  # ties: the first candidate
        listing = [{"text": c.text, "score": s, "tokens": len(c.token_ids), "finish_reason": c.finish_reason} for c, s in zip(candidates, scores)]
        chosen = without_unasked_logprobs(candidates[best], params)
        return attrs.evolve(chosen, extra={**chosen.extra, "scorer": self.scorer_name, "score": scores[best], "best_index": best,
                                                     "candidates": listing, "total_tokens": sum(len(c.token_ids) for c in candidates)})
