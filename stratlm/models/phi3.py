"""Phi-3 / Phi-3.5 / Phi-4 family: the Llama block with the q/k/v projections fused into one
`qkv_proj` and gate/up into one `gate_up_proj` (the checkpoints' own names), LongRoPE scaling
(Phi-3.5, Phi-4-mini), partial rotary (Phi-4-mini rotates 3/4 of each head) and, where the config
sets one below the context (Phi-3-mini-4k: 2047), a sliding window."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from stratlm.core.model import ModelFamily

from .transformer import MLP, Attention, Block, DecoderLM, TransformerArgs, drop_unused


class Phi3Attention(Attention):
    def make_projections(self, a: TransformerArgs) -> None:
        self.q_size, self.kv_size = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.attention_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=a.attention_bias)

    def qkv(self, x: mx.array) -> list[mx.array]:
        return mx.split(self.qkv_proj(x), [self.q_size, self.q_size + self.kv_size], axis=-1)

    def fuse_projections(self) -> None:
        """Already one matrix."""


class Phi3MLP(MLP):
    def make_projections(self, a: TransformerArgs, inter: int) -> None:
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * inter, bias=a.mlp_bias)
        self.down_proj = nn.Linear(inter, a.hidden_size, bias=a.mlp_bias)

    def gate_up(self, x: mx.array) -> list[mx.array]:
        return mx.split(self.gate_up_proj(x), 2, axis=-1)  # gate first, as transformers chunks it

    def fuse_projections(self) -> None:
        """Already one matrix."""


class Phi3Block(Block):
    attention = Phi3Attention

    def make_mlp(self, a: TransformerArgs, layer: int) -> nn.Module:
        return Phi3MLP(a)


def rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling with what LongRoPE needs from the rest of the config (transformers 5 keeps it
    all in rope_parameters; hub configs have rope_scaling and top-level fields)."""
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind in ("longrope", "su"):
        original = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        scaling["original_max_position_embeddings"] = original
        if not scaling.get("factor") and config.get("max_position_embeddings") and original:
            scaling["factor"] = config["max_position_embeddings"] / original
    return scaling


def build(config: dict[str, Any]) -> DecoderLM:
    args = TransformerArgs.from_config(config, rope_scaling=rope_scaling(config))
    return DecoderLM(config, args, Phi3Block)


FAMILY = ModelFamily(name="phi3", build=build, model_types=("phi3",), sanitize=drop_unused)

ALIASES = {
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "phi-4": "microsoft/phi-4",
}
