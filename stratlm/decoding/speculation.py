"""Speculative verification, the piece every draft-then-verify decoder shares (the speculative
strategy's serial loop and the scheduler's batched rows): standard speculative sampling, accept
draft token x with probability min(1, p(x)/q(x)), on rejection sample from normalize(max(0, p - q)),
a bonus token when every draft token is accepted; at temperature 0, keep the draft tokens that
equal the target's argmax."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from stratlm.decoding.processors import History
from stratlm.decoding.sampler import Sampler


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n



def process_positions(logits: mx.array, sequence: Sequence[int], drafted: list[int], sampler: Sampler, start: int) -> mx.array:
    """The logits processors applied at each verified position: row i follows sequence + drafted[:i]
    (the generated tokens begin at `start`). A token's distribution is then exactly what the
    plain loop would give it, so the output distribution stays the target's."""
    if not sampler.processors:
        return logits
    rows = []
    for i in range(len(drafted) + 1):
        history = History(mx.array([list(sequence) + drafted[:i]], dtype=mx.int32), start)
        rows.append(sampler.process(logits[i : i + 1], history))
    return mx.concatenate(rows, axis=0)


def verify(logits: mx.array, drafted: list[int], draft_logprobs: mx.array | None, sampler: Sampler) -> tuple[int, int]:
    """logits (m+1, V) of the target (processed) at the positions before each draft token and
    after the last. Returns (how many draft tokens are accepted, the token that follows them)."""
    m = len(drafted)
    if sampler.params.greedy:
        best = mx.argmax(logits, axis=-1).tolist()
        n = common_prefix_length(drafted, best)
        return n, best[n]
    p = sampler.distribution(logits)  # log-probabilities, (m+1, V)
    n = 0
    if m:
        index = mx.array(drafted, dtype=mx.int32)[:, None]
        p_x = mx.take_along_axis(p[:m], index, axis=-1)[:, 0]
        q_x = mx.take_along_axis(draft_logprobs, index, axis=-1)[:, 0] if draft_logprobs is not None else mx.zeros((m,))
        u = mx.random.uniform(shape=(m,), key=sampler.next_key())
        accepted = (mx.log(u) < p_x - q_x).tolist()  # u < p(x) / q(x)
        n = accepted.index(False) if False in accepted else m
    if n == m:
        dist = p[m]
    else:
        q = mx.exp(draft_logprobs[n]) if draft_logprobs is not None else (mx.arange(p.shape[-1]) == drafted[n]).astype(mx.float32)
        residual = mx.maximum(mx.exp(p[n]) - q, 0.0)
        # p == q leaves nothing: then rejection had probability 0; guard against rounding anyway
        dist = mx.where(residual.sum() > 0, mx.log(residual), p[n])
    return n, int(mx.random.categorical(dist, key=sampler.next_key()).item())
