"""Value types: parameters in, results out. Frozen attrs classes, validated on construction."""

from __future__ import annotations

from typing import Any

import attrs

from .errors import ConfigError


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
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        _check(self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}")
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        _check(self.repetition_context >= 1, f"repetition_context must be >= 1, got {self.repetition_context}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@attrs.frozen
class GenerationParams:
    """What one generation call asks for."""

    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    logprobs: bool = False  # report the chosen tokens' log-probabilities
    top_logprobs: int = 0  # also the most likely alternatives at each position (OpenAI's 0..20)

    def __attrs_post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens > 0, f"max_tokens must be a positive integer, got {self.max_tokens}")
        _check(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20, f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
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
