"""Phi-3 / Phi-3.5 / Phi-4 family: the Llama block with the q/k/v projections fused into one
`qkv_proj` and gate/up into one `gate_up_proj` (the checkpoints' own names), LongRoPE scaling
(Phi-3.5, Phi-4-mini), partial rotary (Phi-4-mini rotates 3/4 of each head) and, where the config
sets one below the context (Phi-3-mini-4k: 2047), a sliding window."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from stratlm.core.model import GGUFSpec, ModelFamily
from stratlm.core.tokenizer import Tokenizer
from stratlm.loaders.gguf_tokenizer import gguf_tokenizer, sentencepiece_tokenizer

from . import llama
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


# -- GGUF (llama.cpp's phi3 architecture) -------------------------------------------------------
GGUF_NAMES = {**llama.GGUF_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}  # ffn_up holds gate then up


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], model_type: str) -> dict[str, Any]:
    """The config, with LongRoPE from the rope_factors_long / _short tensors the converter
    writes (and the attention factor it computed), the partial rotary from the RoPE dimension
    count and the sliding window (0: none, as the converter writes for Phi-4)."""
    config = llama.gguf_config(meta, weights, model_type)

    def get(key: str) -> Any:
        value = meta.get(f"phi3.{key}")
        return value.item() if hasattr(value, "item") else value

    rope_dims = get("rope.dimension_count")
    if rope_dims and rope_dims != config["head_dim"]:
        config["partial_rotary_factor"] = rope_dims / config["head_dim"]
    config["sliding_window"] = get("attention.sliding_window") or None
    long, short = weights.get("rope_factors_long.weight"), weights.get("rope_factors_short.weight")
    if long is not None and short is not None:
        original = get("rope.scaling.original_context_length") or config["max_position_embeddings"]
        config["original_max_position_embeddings"] = original
        config["rope_scaling"] = {"rope_type": "longrope", "long_factor": long.astype(mx.float32).tolist(), "short_factor": short.astype(mx.float32).tolist(),
                                  "original_max_position_embeddings": original, "factor": config["max_position_embeddings"] / original,
                                  "attention_factor": get("rope.scaling.attn_factor")}
    return config


def sanitize(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """The GGUF's LongRoPE factor tensors are in the config (gguf_config), not parameters."""
    return drop_unused({k: v for k, v in weights.items() if not k.startswith("rope_factors_")}, config)


def phi3_gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Phi-3's SentencePiece vocabulary as transformers' GGUF loader rebuilds its tokenizer.json:
    the "▁" prefix from a normalizer (every run of text between special tokens gets one). Phi-4's
    byte-level BPE files are read as any other."""
    if str(meta.get("tokenizer.ggml.model", "")) != "llama":
        return gguf_tokenizer(meta)
    return sentencepiece_tokenizer(meta, prefix_every_segment=True)


FAMILY = ModelFamily(
    name="phi3",
    build=build,
    model_types=("phi3",),
    gguf=GGUFSpec(architectures=("phi3",), tensor_names=GGUF_NAMES, config=gguf_config, tokenizer=phi3_gguf_tokenizer),
    sanitize=sanitize,
)

ALIASES = {
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "phi-4": "microsoft/phi-4",
}
