"""Token sampling: the logits processors (penalties, bias, plugins'), then temperature, top-k,
top-p, min-p; seeded.

`Sampler.process(logits, history)` applies the processors; `Sampler.distribution(logits)` gives
the log-probabilities a token is drawn from. Speculative sampling needs exactly that
distribution for both target and draft.
"""

from __future__ import annotations

import mlx.core as mx

from stratlm.core.types import SamplingParams
from stratlm.decoding.processors import History, LogitsProcessor, make_logits_processors


class Sampler:
    """processors: the logits processors to apply; None asks the registry (`registry`, else the
    process-wide one) for those the parameters need."""

    def __init__(self, params: SamplingParams, registry=None, processors: list[LogitsProcessor] | None = None):
        self.params = params
        self._key = mx.random.key(params.seed) if params.seed is not None else None
        self.processors = make_logits_processors(params, registry) if processors is None else list(processors)

    @property
    def needs_history(self) -> bool:
        """Whether the caller must keep a History: only when a processor is active."""
        return bool(self.processors)

    def start_history(self, tokens: mx.array) -> History | None:
        """The history of prompts (B, T), or None when no processor needs one."""
        return History(tokens, tokens.shape[1]) if self.processors else None

    def next_key(self) -> mx.array | None:
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub

    def process(self, logits: mx.array, history: History | None) -> mx.array:
        """Apply the logits processors in order. logits (B, V); history: each row's tokens so far."""
        if not self.processors:
            return logits
        if history is None:
            raise ValueError("this sampler has logits processors: pass the History (Sampler.start_history)")
        logits = logits.astype(mx.float32)
        for processor in self.processors:
            logits = processor(history, logits)
        return logits

    def distribution(self, logits: mx.array) -> mx.array:
        """Log-probabilities after temperature and the top-k / top-p / min-p filters. logits: (..., V)."""
        p = self.params
        logits = logits.astype(mx.float32)
        if p.greedy:
            return log_softmax(logits)
        logprobs = log_softmax(logits / p.temperature)
        neg_inf = mx.array(-float("inf"), dtype=logprobs.dtype)
        if 0 < p.top_k < logprobs.shape[-1]:
            kth = mx.sort(logprobs, axis=-1)[..., -p.top_k][..., None]
            logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
        if p.min_p > 0:
            top = logprobs.max(axis=-1, keepdims=True)
            logprobs = mx.where(logprobs < top + mx.log(mx.array(p.min_p)), neg_inf, logprobs)
        if p.top_p < 1.0:
            order = mx.argsort(-logprobs, axis=-1)
            sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
            cumulative = mx.cumsum(mx.exp(sorted_lp), axis=-1)
            # keep a token if the mass before it is below top_p (the first token is always kept)
            keep_sorted = (cumulative - mx.exp(sorted_lp)) < p.top_p
            keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
            logprobs = mx.where(keep, logprobs, neg_inf)
        return log_softmax(logprobs)

    def sample(self, logits: mx.array, history: History | None = None) -> mx.array:
        """Next token per row. logits: (B, V) -> (B,) int32."""
        logits = self.process(logits, history)
        if self.params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        return mx.random.categorical(self.distribution(logits), axis=-1, key=self.next_key()).astype(mx.int32)


def log_softmax(x: mx.array) -> mx.array:
    """Log-probabilities over the last axis, in x's dtype (the one helper for it: mlx.nn's is
    mx.compile'd, which on the CPU JIT-compiles a kernel at first use)."""
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
