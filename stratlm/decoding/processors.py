"""Logits processors: a list of functions (history, logits) -> logits applied before sampling.

mlx-lm's shape (`make_logits_processors`), with one difference: a processor sees a `History`,
which says where the generated tokens begin, because OpenAI's presence and frequency penalties
count only the generated tokens while the repetition penalty looks at the prompt too.

Processors are found through the `register_logits_processors` hook: each registered factory
takes the SamplingParams and returns a processor, or None when the parameters do not ask for
it (so a generation that asks for nothing pays nothing). The built-ins below are registered by
stratlm.plugins.strategies. Every row of a batch has its own history (one row of `tokens`).
"""

from __future__ import annotations

from typing import Callable

import attrs
import mlx.core as mx

from stratlm.core.errors import ConfigError
from stratlm.core.types import SamplingParams


@attrs.frozen
class History:
    """The tokens of each row so far: tokens (B, T) int32, the prompt (left-padded in a batch)
    then the generated tokens, which begin at column `start` in every row."""

    tokens: mx.array
    start: int

    @property
    def generated(self) -> mx.array:
        return self.tokens[:, self.start :]

    def append(self, token: mx.array) -> "History":
        """token (B,) -> the history one step on."""
        return History(mx.concatenate([self.tokens, token[:, None]], axis=1), self.start)

    def rows(self, index: mx.array) -> "History":
        """The rows still decoding (a batch drops finished rows)."""
        return History(self.tokens[index], self.start)


LogitsProcessor = Callable[[History, mx.array], mx.array]
ProcessorFactory = Callable[[SamplingParams], "LogitsProcessor | None"]


def repetition_penalty(params: SamplingParams) -> LogitsProcessor | None:
    """CTRL's penalty over the last `repetition_context` tokens, prompt included: a seen
    token's logit is divided by the penalty (multiplied when negative)."""
    penalty, context = params.repetition_penalty, params.repetition_context
    if penalty == 1.0:
        return None

    def process(history: History, logits: mx.array) -> mx.array:
        recent = history.tokens[:, -context:]
        if recent.shape[-1] == 0:
            return logits
        picked = mx.take_along_axis(logits, recent, axis=-1)
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        return mx.put_along_axis(logits, recent, picked, axis=-1)

    return process


def presence_frequency_penalty(params: SamplingParams) -> LogitsProcessor | None:
    """OpenAI's penalties over the generated tokens: logit -= count * frequency + (count > 0) * presence."""
    presence, frequency = params.presence_penalty, params.frequency_penalty
    if presence == 0 and frequency == 0:
        return None

    def process(history: History, logits: mx.array) -> mx.array:
        generated = history.generated
        if generated.shape[-1] == 0:
            return logits
        rows = mx.arange(generated.shape[0])[:, None]
        counts = mx.zeros(logits.shape, dtype=mx.float32).at[rows, generated].add(1.0)  # duplicates accumulate
        return logits - (counts * frequency + (counts > 0) * presence)

    return process


def logit_bias(params: SamplingParams) -> LogitsProcessor | None:
    """A fixed bias added to chosen tokens' logits (OpenAI: -100 bans a token, 100 forces it)."""
    if not params.logit_bias:
        return None
    ids = list(params.logit_bias)
    index = mx.array(ids, dtype=mx.int32)
    bias = mx.array([params.logit_bias[i] for i in ids], dtype=mx.float32)
    top = max(ids)

    def process(history: History, logits: mx.array) -> mx.array:
        if top >= logits.shape[-1]:
            raise ConfigError(f"logit_bias names token {top}, but this model's vocabulary has {logits.shape[-1]} tokens (ids 0..{logits.shape[-1] - 1})")
        return logits.at[..., index].add(bias)

    return process


#: the built-in processors, in the order they apply
BUILTIN: dict[str, ProcessorFactory] = {
    "repetition_penalty": repetition_penalty,
    "presence_frequency_penalty": presence_frequency_penalty,
    "logit_bias": logit_bias,
}


def make_logits_processors(params: SamplingParams, registry=None) -> list[LogitsProcessor]:
    """The processors the parameters ask for, from every registered factory (the process-wide
    registry when none is given)."""
    if registry is None:
        from stratlm.core.registry import get_registry

        registry = get_registry()
    processors = []
    for entry in registry.table("logits processor").values():
        processor = entry.obj(params)
        if processor is not None:
            processors.append(processor)
    return processors
