"""The loop every strategy shares: the prefill, the compiled decode step and the single-sequence
decode loop (evaluated one step ahead, so the host never waits on the device between tokens)."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import attrs
import mlx.core as mx

from stratlm.core.cache import KVCache, StaticKVCache
from stratlm.core.model import Model
from stratlm.decoding.sampler import Sampler, log_softmax
from stratlm.env import flag
from stratlm.core.tokenizer import Tokenizer
from stratlm.core.types import GenerationParams, GenerationResult
from stratlm.decoding.completion import complete

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts
DECODE_RESERVE = 256  # positions a decode cache holds beyond the prompt before it grows


def prefill(model: Model, tokens: mx.array, cache: list[KVCache], chunk: int = PREFILL_CHUNK) -> mx.array:
    """Run the prompt (B, L) through the model; return the last position's logits (B, vocab).

    All but the last position only fill the cache: only the cache is evaluated, so (MLX being
    lazy) their logits, (B, L, vocab), are never computed; the last position's forward gives them.
    """
    rest, last = tokens[:, :-1], tokens[:, -1:]
    while rest.shape[1] > 0:
        model(rest[:, :chunk], cache)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        rest = rest[:, chunk:]
    return model(last, cache)[:, -1, :]


def token_logprobs(logits: mx.array, tokens: mx.array) -> mx.array:
    """log p(token) under the raw model distribution. logits (B, V), tokens (B,) -> (B,)."""
    return mx.take_along_axis(log_softmax(logits.astype(mx.float32)), tokens[:, None], axis=-1)[:, 0]


def compiled_decoding(model: Model) -> bool:
    """Whether `decode` uses the compiled step: STRATLM_COMPILE=on or off decides; unset, the model
    does (Model.compiled_decoding_pays: on CUDA in the fused layout). On the CPU it is measured no
    faster than the plain forward (memory-bound), and its first use JIT-compiles kernels for minutes."""
    setting = flag("STRATLM_COMPILE")
    return model.compiled_decoding_pays() if setting is None else setting


class CompiledStep:
    """The model's forward for decoding, traced by mx.compile over StaticKVCaches.

    The trace is replayed for every token: the host builds no graph per step, elementwise
    ops are fused, and nothing waits on the device. The cache state goes in and out as
    arrays; the trace is redone only when the cache grows (a new shape).
    """

    def __init__(self, model: Model, cache: list[StaticKVCache]):
        self.model, self.cache = model, cache
        self._step = mx.compile(self._forward)

    def _forward(self, tokens: mx.array, position: mx.array, state: list[tuple[mx.array, mx.array]]):
        for layer_cache, (keys, values) in zip(self.cache, state):
            layer_cache.keys, layer_cache.values, layer_cache.position = keys, values, position
            layer_cache.tracing = True
        try:
            logits = self.model(tokens, self.cache)[:, -1, :]
        finally:
            for layer_cache in self.cache:
                layer_cache.tracing = False
        return logits, position + tokens.shape[1], [(c.keys, c.values) for c in self.cache]

    def __call__(self, tokens: mx.array) -> mx.array:
        """tokens (B, L) -> the last position's logits (B, vocab); the cache advances by L."""
        n, offset = tokens.shape[1], self.cache[0].offset
        for layer_cache in self.cache:
            layer_cache.reserve(n)
        state = [(c.keys, c.values) for c in self.cache]
        logits, position, state = self._step(tokens, self.cache[0].position, state)
        for layer_cache, (keys, values) in zip(self.cache, state):
            layer_cache.keys, layer_cache.values, layer_cache.position = keys, values, position
            layer_cache.offset = offset + n  # the trace's own bookkeeping ran once, at trace time
        return logits


def decode_forward(model: Model, prompt_length: int, cache: list[KVCache] | None = None) -> tuple[list[KVCache], Callable[[mx.array], mx.array]]:
    """A cache for decoding one prompt and the step function over it: tokens (B, L) -> logits (B, vocab).

    With compiled decoding (`compiled_decoding`), no given cache, and a model that makes the
    standard cache, the cache is preallocated and the step compiled; otherwise the step is the
    plain forward.
    """
    if cache is None:
        cache = model.make_cache()
        if compiled_decoding(model) and all(type(c) is KVCache for c in cache):  # the standard cache, not a model's own
            static = [StaticKVCache(prompt_length + DECODE_RESERVE) for _ in model.layers]
            return static, CompiledStep(model, static)
    return cache, lambda tokens: model(tokens, cache)[:, -1, :]


def decode(
    model: Model,
    prompt: Sequence[int],
    sampler: Sampler,
    *,
    cache: list[KVCache] | None = None,
    logprobs: bool = False,
) -> Iterator[tuple[int, float | None]]:
    """Yield (token, logprob) forever for one prompt; the caller decides when to stop.

    The next step is queued (async_eval) before the current token is handed over.
    """
    cache, step = decode_forward(model, len(prompt), cache)
    history = sampler.start_history(mx.array([list(prompt)], dtype=mx.int32))

    def pick(logits: mx.array) -> tuple[mx.array, mx.array | None]:
        token = sampler.sample(logits, history)
        return token, (token_logprobs(logits, token) if logprobs else None)

    token, lp = pick(prefill(model, mx.array([list(prompt)], dtype=mx.int32), cache))
    mx.async_eval(token, lp) if lp is not None else mx.async_eval(token)
    while True:
        if history is not None:
            history = history.append(token)
        next_token, next_lp = pick(step(token[:, None]))
        mx.async_eval(next_token, next_lp) if next_lp is not None else mx.async_eval(next_token)
        yield int(token.item()), (float(lp.item()) if lp is not None else None)
        token, lp = next_token, next_lp


def within_context(params: GenerationParams, prompt_length: int, context_length: int | None) -> GenerationParams:
    """`params` with max_tokens cut so prompt + generated tokens fit the model's context: the
    completion then ends there with finish reason "length" (past it a model's positions are
    ones it never saw in training: the text degrades)."""
    if context_length is None or prompt_length + params.max_tokens <= context_length:
        return params
    return attrs.evolve(params, max_tokens=max(1, context_length - prompt_length))


def run_single(
    model: Model,
    tokenizer: Tokenizer,
    eos_token_ids: frozenset[int],
    prompt: Sequence[int],
    params: GenerationParams,
    sampler: Sampler | None = None,
    registry=None,
    context_length: int | None = None,
) -> Iterator[str | GenerationResult]:
    """Decode one prompt, yielding text pieces and finally the GenerationResult (the logits
    processors from `registry` unless a sampler is given). With `context_length`, generation
    stops where the prompt and the tokens fill it (finish reason "length")."""
    params = within_context(params, len(prompt), context_length)
    sampler = sampler or Sampler(params.sampling, registry)
    tokens = decode(model, prompt, sampler, logprobs=params.logprobs)
    yield from complete(tokens, tokenizer, eos_token_ids, len(prompt), params)
