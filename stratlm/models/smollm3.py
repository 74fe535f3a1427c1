"""SmolLM3: the Llama block where every fourth layer (`no_rope_layers` 0) attends without RoPE
(NoPE), as transformers builds it."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import ModelFamily

from .transformer import DecoderLM, TransformerArgs, drop_unused


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """SmolLM3Config's defaults where they differ from the other families': a tied head, no window."""
    defaults = {"tie_word_embeddings": True, "use_sliding_window": False}
    return {**config, **{k: v for k, v in defaults.items() if config.get(k) is None}}


def build(config: dict[str, Any]) -> DecoderLM:
    config = with_defaults(config)
    layers = config.get("num_hidden_layers", 0)  # (missing: TransformerArgs names it)
    interval = config.get("no_rope_layer_interval") or 4
    rope_layers = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    return DecoderLM(config, TransformerArgs.from_config(config, rope_layers=tuple(bool(r) for r in rope_layers)))


def sanitize(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return drop_unused(weights, with_defaults(config))


FAMILY = ModelFamily(name="smollm3", build=build, model_types=("smollm3",), sanitize=sanitize)

ALIASES = {"smollm3-3b": "HuggingFaceTB/SmolLM3-3B"}
