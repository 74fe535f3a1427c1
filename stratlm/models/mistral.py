"""Mistral family: the Llama block; v0.1 attends over a sliding window of `sliding_window`
positions (a RotatingKVCache per layer, so prompts and generations longer than the window are
exact), v0.2+ (sliding_window null) over everything. Its GGUF files are llama architecture and
load through the Llama family."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import ModelFamily

from .transformer import DecoderLM, TransformerArgs, drop_unused


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(config, TransformerArgs.from_config(config))


FAMILY = ModelFamily(name="mistral", build=build, model_types=("mistral",), sanitize=drop_unused)

ALIASES = {
    "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
}
