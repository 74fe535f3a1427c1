"""Token sampling: temperature, top-k, top-p, min-p, repetition penalty, seeded.

`Sampler.distribution(logits)` gives the processed log-probabilities a token is drawn from;
speculative sampling needs exactly that distribution for both target and draft.
"""

from __future__ import annotations

import mlx.core as mx

from stratlm.core.types import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._key = mx.random.key(params.seed) if params.seed is not None else None

    def next_key(self) -> mx.array | None:
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub

    def penalize(self, logits: mx.array, history: mx.array | None) -> mx.array:
        """Repetition penalty (CTRL style) over the recent tokens of each row. history: (B, T) int."""
        p = self.params
        if p.repetition_penalty == 1.0 or history is None or history.shape[-1] == 0:
            return logits
        recent = history[:, -p.repetition_context :]
        picked = mx.take_along_axis(logits, recent, axis=-1)
        picked = mx.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        return mx.put_along_axis(logits, recent, picked, axis=-1)

    def distribution(self, logits: mx.array) -> mx.array:
        """Log-probabilities after temperature and the top-k / top-p / min-p filters. logits: (..., V)."""
        p = self.params
        logits = logits.astype(mx.float32)
        if p.greedy:
            return nn_log_softmax(logits)
        logprobs = nn_log_softmax(logits / p.temperature)
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
        return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)

    def sample(self, logits: mx.array, history: mx.array | None = None) -> mx.array:
        """Next token per row. logits: (B, V) -> (B,) int32."""
        logits = self.penalize(logits, history)
        if self.params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        return mx.random.categorical(self.distribution(logits), axis=-1, key=self.next_key()).astype(mx.int32)


def nn_log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
