"""Value types: parameters in, results out. Frozen attrs classes, validated on construction."""

from __future__ import annotations

import math
from typing import Any

import attrs

from .errors import ConfigError


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stop_strings(value: Any) -> tuple[str, ...]:
    """A stop string or a list of them, as a tuple (anything else is named)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"stop must be a string or a list of strings, got {type(value).__name__}: {value!r}")
    return tuple(value)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@attrs.frozen
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated
    # token id -> bias added to its logit (-100 bans, 100 forces); not part of the hash
    logit_bias: dict[int, float] = attrs.field(factory=dict, converter=lambda d: dict(d or {}), hash=False)
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        # types first: a string or an inf must be named as such, not fail a comparison
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(is_number(value) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "repetition_context"):
            value = getattr(self, name)
            _check(is_int(value), f"{name} must be an integer, got {value!r}")
        _check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**64),
               f"seed must be an integer in [0, 2**64) or None (a fresh seed each call), got {self.seed!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        _check(self.repetition_context >= 1, f"repetition_context must be >= 1, got {self.repetition_context}")
        for token, bias in self.logit_bias.items():
            _check(isinstance(token, int) and not isinstance(token, bool) and token >= 0,
                   f"logit_bias keys must be token ids (ints >= 0), got {token!r}; convert JSON's string keys with int()")
            _check(isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias) and -100 <= bias <= 100,
                   f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@attrs.frozen
class GenerationParams:
    """What one generation call asks for."""

    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = attrs.field(default=(), converter=stop_strings)
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    logprobs: bool = False  # report the chosen tokens' log-probabilities
    top_logprobs: int = 0  # also the most likely alternatives at each position (OpenAI's 0..20)

    def __attrs_post_init__(self) -> None:
        _check(is_int(self.max_tokens) and self.max_tokens > 0, f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _check(isinstance(self.ignore_eos, bool), f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        _check(isinstance(self.logprobs, bool), f"logprobs must be True or False, got {self.logprobs!r}")
        _check(is_int(self.top_logprobs) and 0 <= self.top_logprobs <= 20, f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop!r}")


@attrs.frozen
class GenerationStats:
    """Counts only real tokens: no padding, nothing after a row finished."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_time: float = 0.0
    generation_time: float = 0.0
    peak_memory_gb: float = 0.0
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    queue_time: float = 0.0  # waiting for admission before the prefill started

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time > 0 else 0.0


@attrs.frozen
class GenerationResult:
    """One completion. `extra` carries a strategy's own statistics (candidates, votes, acceptance)."""

    text: str
    token_ids: tuple[int, ...] = attrs.field(converter=tuple)
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens or the context) or "cancelled"
    prompt: str = ""
    logprobs: tuple[float, ...] | None = None
    stats: GenerationStats = GenerationStats()
    extra: dict[str, Any] = attrs.field(factory=dict)
    #: per generated token, the top_logprobs most likely token ids -> log-probability (when asked)
    top_logprobs: tuple[dict[int, float], ...] | None = None
