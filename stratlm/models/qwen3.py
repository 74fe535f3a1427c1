"""Qwen3 family: the Llama block plus RMSNorm on each head's queries and keys. Its GGUF files use
Llama's tensor names and metadata; their Q/K rows are not permuted (Qwen uses the NeoX RoPE layout)."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import GGUFSpec, ModelFamily

from .llama import GGUF_NAMES, gguf_config
from .qwen2 import layer_types
from .transformer import DecoderLM, TransformerArgs, drop_unused


def build(config: dict[str, Any]) -> DecoderLM:
    config = {**config, "use_sliding_window": config.get("use_sliding_window", False)}  # transformers' default, as Qwen2's
    return DecoderLM(config, TransformerArgs.from_config(config, qk_norm=True, layer_types=layer_types(config)))


FAMILY = ModelFamily(
    name="qwen3",
    build=build,
    model_types=("qwen3",),
    gguf=GGUFSpec(architectures=("qwen3",), tensor_names=GGUF_NAMES, config=gguf_config),
    sanitize=drop_unused,
)

ALIASES = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
}
