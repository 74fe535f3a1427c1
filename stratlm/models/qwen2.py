"""Qwen2 / Qwen2.5 family: the Llama block with biases on the q/k/v projections (not o_proj).
With `use_sliding_window`, layers from `max_window_layers` on attend over a sliding window (as
transformers builds its `layer_types`). Its GGUF files use Llama's tensor names (plus the
biases) and metadata, Q/K rows not permuted (Qwen uses the NeoX RoPE layout)."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import GGUFSpec, ModelFamily

from .llama import GGUF_NAMES, gguf_config
from .transformer import DecoderLM, TransformerArgs, drop_unused


def layer_types(config: dict[str, Any]) -> tuple[str, ...] | None:
    if config.get("layer_types"):
        return tuple(config["layer_types"])
    if not config.get("use_sliding_window", False) or config.get("sliding_window") is None:
        return None
    first = config.get("max_window_layers", 28)  # transformers' default
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(config["num_hidden_layers"]))


def build(config: dict[str, Any]) -> DecoderLM:
    # transformers' Qwen2 default is no sliding window (Llama's parsing defaults use_sliding_window to true)
    config = {**config, "use_sliding_window": config.get("use_sliding_window", False)}
    return DecoderLM(config, TransformerArgs.from_config(config, qkv_bias=True, layer_types=layer_types(config)))


FAMILY = ModelFamily(
    name="qwen2",
    build=build,
    model_types=("qwen2",),
    gguf=GGUFSpec(architectures=("qwen2",), tensor_names=GGUF_NAMES, config=gguf_config),
    sanitize=drop_unused,
)

ALIASES = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}
