"""OLMo 2: the Llama layers with the norms moved after attention and the MLP (no norm before
them), and RMSNorm on the whole query and key projections (across heads) before RoPE."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from stratlm.core.model import ModelFamily

from .transformer import Attention, Block, DecoderLM, TransformerArgs, drop_unused


class Olmo2Attention(Attention):
    qk_norm_per_head = False

    def make_projections(self, a: TransformerArgs) -> None:
        super().make_projections(a)
        self.q_norm = nn.RMSNorm(a.num_attention_heads * a.head_dim, eps=a.rms_norm_eps)
        self.k_norm = nn.RMSNorm(a.num_key_value_heads * a.head_dim, eps=a.rms_norm_eps)

    def qkv(self, x: mx.array) -> list[mx.array]:
        q, k, v = super().qkv(x)
        return [self.q_norm(q), self.k_norm(k), v]


class Olmo2Block(Block):
    attention = Olmo2Attention

    def __init__(self, a: TransformerArgs, layer: int = 0):
        super().__init__(a, layer)
        self.pop("input_layernorm")
        self.post_feedforward_layernorm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(x, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(config, TransformerArgs.from_config(config), Olmo2Block)


FAMILY = ModelFamily(name="olmo2", build=build, model_types=("olmo2",), sanitize=drop_unused)

ALIASES = {
    "olmo-2-1b": "allenai/OLMo-2-0425-1B-Instruct",
    "olmo-2-7b": "allenai/OLMo-2-1124-7B-Instruct",
}
