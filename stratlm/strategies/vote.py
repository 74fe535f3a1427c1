"""vote (majority / self-consistency): n samples in one batch, an answer extracted from each,
the most frequent answer wins.

An answer extractor maps a completion's text to an answer string, or None when the text
holds no answer. Registered: "last_number", "boxed" (the last \\boxed{...}), "text" (the
whole text, normalised). Equal counts are broken by the higher mean log-probability of the
answer's best completion, then by the answer itself, so the outcome is deterministic.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

import attrs

from stratlm.core.types import GenerationParams, GenerationResult

from .best_of_n import mean_logprob_score
from .candidates import Candidates, without_unasked_logprobs
from .options import plugin_option

Extractor = Callable[[str], "str | None"]

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str:
    number = text.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", "", "-"):
        number = "0"
    return number


def last_number(text: str) -> str | None:
    """The last number in the text ("1,000.50" -> "1000.5"); None if there is none."""
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (nested braces allowed), stripped; None if absent."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unclosed


def whole_text(text: str) -> str | None:
    """The text lower-cased, whitespace collapsed, trailing punctuation dropped."""
    normal = " ".join(text.lower().split()).rstrip(".!?;:, ")
    return normal or None


EXTRACTORS: dict[str, Extractor] = {"last_number": last_number, "boxed": boxed, "text": whole_text}


class Vote(Candidates):
    """n sampled candidates per prompt; the most frequent extracted answer wins (self-consistency)."""

    name = "vote"
    options = ("n", "extractor")

    def __init__(self, target: Any, n: int | str = 5, extractor: str | Extractor = "last_number", **options: Any):
        super().__init__(target, n, **options)
        self.extractor_name, self.extractor = plugin_option(self.name, "extractor", extractor, "answer extractor", self.registry)

    def choose(self, samples: list[GenerationResult], params: GenerationParams) -> GenerationResult:
        """The most frequent answer's most likely completion."""
        answers = [self.extractor(s.text) for s in samples]
        quality = [mean_logprob_score(s) for s in samples]
        votes = Counter(a for a in answers if a is not None)
        best_quality = {a: max(q for b, q in zip(answers, quality) if b == a) for a in votes}
        ranking = sorted(votes, key=lambda a: (-votes[a], -best_quality[a], a))
        winner = ranking[0] if ranking else None
        # the representative: the most likely completion that gave the winning answer (any, if none did)
        pool = [i for i, a in enumerate(answers) if a == winner] if winner is not None else list(range(len(samples)))
        representative = max(pool, key=lambda i: (quality[i], -i))
        chosen = without_unasked_logprobs(samples[representative], params)
        return attrs.evolve(
            chosen,
            extra={
                **chosen.extra,
                "extractor": self.extractor_name,
                "answer": winner,
                "count": votes[winner] if winner is not None else 0,
                "n": len(samples),
                "votes": {a: votes[a] for a in ranking},
                "samples": [{"text": s.text, "answer": a, "mean_logprob": q} for s, a, q in zip(samples, answers, quality)],
                "total_tokens": sum(len(s.token_ids) for s in samples),
            },
        )
