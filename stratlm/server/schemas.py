"""Request bodies of the OpenAI-compatible endpoints (pydantic), plus stratlm's own fields.

Fields OpenAI defines but this server cannot honour are rejected with 400 naming them, never
silently ignored; a few that only describe the caller (`user`, `metadata`, `store`, ...) are
accepted and ignored. Any other unknown top-level field is an error unless the chosen strategy
declares it as an option (`"strategy": "vote", "extractor": "boxed"`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: OpenAI fields that change nothing here: accepted and ignored
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice", "prediction", "modalities"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    """A chat message; extra keys (tool_calls, tool_call_id, name, ...) pass through to the template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def for_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                kinds = sorted({part.type for part in content if part.type != "text"})
                raise ValueError(f"only text content parts are supported, got {', '.join(kinds)}")
            content = "".join(part.text or "" for part in content)
        message = {**(self.model_extra or {}), "role": "system" if self.role == "developer" else self.role, "content": content or ""}
        return message


class CommonRequest(BaseModel):
    """Fields both endpoints take. extra="allow": the app checks the rest against the strategy's options."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # beyond OpenAI (vLLM spells these the same way)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: bool = False
    # stratlm's own
    strategy: Optional[str] = None
    strategy_options: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return None
        out = {}
        for key, bias in value.items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys are token ids, got {key!r}") from None
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
            out[token] = bias
        return out


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[dict[str, Any]]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)  # legacy API: how many top alternatives
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p for p in prompts):
            raise ValueError("the prompt must be a non-empty string or a non-empty list of non-empty strings")
        return value
