"""Granite (IBM Granite 3.x dense): the Llama block with muP multipliers: embeddings scaled by
embedding_multiplier, each block's attention and MLP outputs by residual_multiplier, attention
scores by attention_multiplier (instead of head_dim ** -0.5), logits divided by logits_scaling."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from stratlm.core.model import ModelFamily

from .transformer import Block, DecoderLM, TransformerArgs, drop_unused


class GraniteBlock(Block):
    residual_multiplier = 1.0  # set per model in build

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier


class Granite(DecoderLM):
    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens) * self.config.get("embedding_multiplier", 1.0)

    def head(self, hidden: mx.array) -> mx.array:
        return super().head(hidden) / self.config.get("logits_scaling", 1.0)


def build(config: dict[str, Any]) -> Granite:
    class Block_(GraniteBlock):
        residual_multiplier = float(config.get("residual_multiplier", 1.0))

    args = TransformerArgs.from_config(config, attention_scale=config.get("attention_multiplier"))
    return Granite(config, args, Block_)


FAMILY = ModelFamily(name="granite", build=build, model_types=("granite",), sanitize=drop_unused)

ALIASES = {
    "granite-3.3-2b": "ibm-granite/granite-3.3-2b-instruct",
    "granite-3.3-8b": "ibm-granite/granite-3.3-8b-instruct",
}
