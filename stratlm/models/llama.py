"""Llama family (Llama 2/3, SmolLM2, Mistral-style dense models)."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import ModelFamily

from .transformer import DecoderLM, TransformerArgs, drop_unused


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(config, TransformerArgs.from_config(config))


FAMILY = ModelFamily(
    name="llama",
    build=build,
    model_types=("llama", "mistral"),
    gguf_architectures=("llama",),
    gguf_permute_qk=True,  # llama.cpp's converter permutes Q/K rows for ggml's RoPE
    sanitize=drop_unused,
)

ALIASES = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
}
