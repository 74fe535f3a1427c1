"""SmolLM3: the Llama block where every fourth layer (`no_rope_layers` 0) attends without RoPE
(NoPE), as transformers builds it."""

from __future__ import annotations

from typing import Any

from stratlm.core.model import ModelFamily

from .transformer import DecoderLM, TransformerArgs, drop_unused


def build(config: dict[str, Any]) -> DecoderLM:
    layers = config["num_hidden_layers"]
    interval = config.get("no_rope_layer_interval") or 4
    rope_layers = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    config = {**config, "use_sliding_window": config.get("use_sliding_window", False)}
    return DecoderLM(config, TransformerArgs.from_config(config, rope_layers=tuple(bool(r) for r in rope_layers)))


FAMILY = ModelFamily(name="smollm3", build=build, model_types=("smollm3",), sanitize=drop_unused)

ALIASES = {"smollm3-3b": "HuggingFaceTB/SmolLM3-3B"}
