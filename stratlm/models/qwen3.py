"""Qwen3 family: the Llama block plus RMSNorm on each head's queries and keys."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import ModelFamily

from .transformer import DecoderLM, TransformerArgs, drop_unused


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(config, TransformerArgs.from_config(config, qk_norm=True))


FAMILY = ModelFamily(
    name="qwen3",
    build=build,
    model_types=("qwen3",),
    gguf_architectures=("qwen3",),
    gguf_permute_qk=False,  # Qwen uses the NeoX RoPE layout; its GGUF rows are not permuted
    sanitize=drop_unused,
)

ALIASES = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
}
