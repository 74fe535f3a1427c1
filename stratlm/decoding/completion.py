"""`Completion` turns a row's tokens into text, honours EOS and stop strings, and builds the
result; `complete` feeds a token stream through one and times it."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import mlx.core as mx

from stratlm.core.tokenizer import Tokenizer
from stratlm.core.types import GenerationParams, GenerationResult, GenerationStats
from stratlm.decoding.detokenizer import StreamingDetokenizer


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
        self.detok = StreamingDetokenizer(tokenizer)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.generated = 0  # every sampled token, EOS included: the work done
        self.shown = 0  # characters of detok.text handed out
        self.finish_reason: str | None = None
        self._text_end: int | None = None  # where a stop string cut the text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> str:
        """Take the next token (with its log-probability and the top alternatives', when asked);
        return the text that can be shown now."""
        if self.finished:
            return ""
        self.generated += 1
        if token in self.eos:
            self.finish_reason = "stop"
            return self._flush()
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
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

    def end(self, reason: str) -> str:
        """Finish now (the context is full: "length"; the caller left: "cancelled"); return
        the text held back so far."""
        if self.finished:
            return ""
        self.finish_reason = reason
        return self._flush()

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
            top_logprobs=tuple(self.top_logprobs) if self.params.top_logprobs else None,
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
