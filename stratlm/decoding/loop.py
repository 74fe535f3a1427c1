"""The pieces every strategy shares: the prefill, the single-sequence decode loop
(evaluated one step ahead, so the host never waits on the device between tokens) and
`Completion`, which turns a row's tokens into text, honours EOS and stop strings, and
builds the result."""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from stratlm.core.cache import KVCache, StaticKVCache
from stratlm.core.model import Model
from stratlm.decoding.sampler import Sampler
from stratlm.core.tokenizer import Tokenizer
from stratlm.core.types import GenerationParams, GenerationResult, GenerationStats

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
    picked = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1)


def compiled_decoding(model: Model) -> bool:
    """Whether `decode` uses the compiled step: STRATLM_COMPILE=on or off decides; unset, the model
    does (Model.compiled_decoding_pays: on CUDA in the fused layout). On the CPU it is measured no
    faster than the plain forward (memory-bound), and its first use JIT-compiles kernels for minutes."""
    setting = os.environ.get("STRATLM_COMPILE", "").lower()
    if setting in ("on", "1", "yes", "true"):
        return True
    if setting in ("off", "0", "no", "false"):
        return False
    return model.compiled_decoding_pays()


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
    needs_history = sampler.params.repetition_penalty != 1.0
    history = mx.array([list(prompt)], dtype=mx.int32) if needs_history else None

    def pick(logits: mx.array) -> tuple[mx.array, mx.array | None]:
        token = sampler.sample(logits, history)
        return token, (token_logprobs(logits, token) if logprobs else None)

    token, lp = pick(prefill(model, mx.array([list(prompt)], dtype=mx.int32), cache))
    mx.async_eval(token, lp) if lp is not None else mx.async_eval(token)
    while True:
        if needs_history:
            history = mx.concatenate([history, token[:, None]], axis=1)
        next_token, next_lp = pick(step(token[:, None]))
        mx.async_eval(next_token, next_lp) if next_lp is not None else mx.async_eval(next_token)
        yield int(token.item()), (float(lp.item()) if lp is not None else None)
        token, lp = next_token, next_lp


class Completion:
    """One row's output as it grows: text pieces safe to show, and when it is finished.

    Text that could be the start of a stop string is held back until it is decided. With
    `stream=False` and no stop strings nobody reads the text before the end, so it is decoded
    once then, not token by token (host time a batch row would otherwise spend every step).
    """

    def __init__(self, tokenizer: Tokenizer, params: GenerationParams, eos_token_ids: frozenset[int], *, stream: bool = True):
        self.tokenizer, self.params = tokenizer, params
        self.incremental = stream or bool(params.stop)
        self.eos = frozenset() if params.ignore_eos else eos_token_ids
        self.detok = tokenizer.detokenizer()
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.generated = 0  # every sampled token, EOS included: the work done
        self.shown = 0  # characters of detok.text handed out
        self.finish_reason: str | None = None
        self._text_end: int | None = None  # where a stop string cut the text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float | None = None) -> str:
        """Take the next token; return the text that can be shown now."""
        if self.finished:
            return ""
        self.generated += 1
        if token in self.eos:
            self.finish_reason = "stop"
            return self._flush()
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if not self.incremental:
            if len(self.tokens) >= self.params.max_tokens:
                self.finish_reason = "length"
            return ""
        self.detok.add(token)
        text = self.detok.text
        for stop in self.params.stop:
            at = text.find(stop, max(0, self.shown - len(stop)))
            if at != -1:
                self._text_end = at if self._text_end is None else min(self._text_end, at)
        if self._text_end is not None:
            self.finish_reason = "stop"
            return self._flush()
        if len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
            return self._flush()
        safe = len(text) - self._held_back(text)
        piece, self.shown = text[self.shown : safe], max(self.shown, safe)
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _flush(self) -> str:
        if not self.incremental:
            return ""
        self.detok.finish()
        end = self._text_end if self._text_end is not None else len(self.detok.text)
        piece, self.shown = self.detok.text[self.shown : end], end
        return piece

    @property
    def text(self) -> str:
        if not self.incremental:
            return self.tokenizer.decode(self.tokens)
        end = self._text_end if self._text_end is not None else len(self.detok.text)
        return self.detok.text[:end]

    def result(self, stats: GenerationStats, prompt: str = "", **extra) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=self.tokens,
            finish_reason=self.finish_reason or "length",
            prompt=prompt,
            logprobs=tuple(self.logprobs) if self.params.logprobs else None,
            stats=stats,
            extra=extra,
        )


class Timer:
    """Prompt and generation wall time, and peak memory, for GenerationStats."""

    def __init__(self) -> None:
        mx.reset_peak_memory()
        self.start = time.perf_counter()
        self.first_token: float | None = None

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def stats(self, prompt_tokens: int, generation_tokens: int) -> GenerationStats:
        end = time.perf_counter()
        first = self.first_token or end
        return GenerationStats(
            prompt_tokens=prompt_tokens,
            generation_tokens=generation_tokens,
            prompt_time=first - self.start,
            generation_time=end - first,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )


def run_single(
    model: Model,
    tokenizer: Tokenizer,
    eos_token_ids: frozenset[int],
    prompt: Sequence[int],
    params: GenerationParams,
    sampler: Sampler | None = None,
) -> Iterator[str | GenerationResult]:
    """Decode one prompt, yielding text pieces and finally the GenerationResult."""
    sampler = sampler or Sampler(params.sampling)
    tokens = decode(model, prompt, sampler, logprobs=params.logprobs)
    yield from complete(tokens, tokenizer, eos_token_ids, len(prompt), params)


def complete(
    tokens: Iterator[tuple[int, float | None]],
    tokenizer: Tokenizer,
    eos_token_ids: frozenset[int],
    prompt_length: int,
    params: GenerationParams,
    extra: Callable[[], dict] = dict,
) -> Iterator[str | GenerationResult]:
    """Feed a lazy (token, logprob) stream into a Completion: yield text pieces, then the result.

    The stream's first token is taken to include the prefill; `extra()` is read at the end."""
    completion = Completion(tokenizer, params, eos_token_ids)
    timer = Timer()
    for token, lp in tokens:
        timer.mark_first_token()
        piece = completion.add(token, lp)
        if piece:
            yield piece
        if completion.finished:
            break
    # the first token costs the prefill; generation speed counts the tokens after it
    stats = timer.stats(prompt_length, max(0, completion.generated - 1))
    yield completion.result(stats, **extra())
