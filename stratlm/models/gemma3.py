"""Gemma 3 (text): the Llama-style block with Gemma's RMSNorm (scales by 1 + weight), four norms
a block (before and after attention and the MLP), q/k norms, GELU (tanh) gating, queries scaled by
query_pre_attn_scalar ** -0.5, embeddings scaled by sqrt(hidden_size), and interleaved attention:
five sliding-window ("local") layers to one global, each kind with its own RoPE base (10k local,
1M global; the global one may be scaled). The multimodal checkpoints (gemma-3-4b and up,
model_type gemma3) load as their text model: the vision tower's weights are dropped."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from stratlm.core.errors import ModelLoadError
from stratlm.core.model import GGUFSpec, ModelFamily
from stratlm.core.tokenizer import Tokenizer
from stratlm.loaders.gguf_tokenizer import GGUF_USER_DEFINED, gguf_tokenizer, sentencepiece_tokenizer, token_types

from . import llama
from .transformer import Attention, Block, DecoderLM, TransformerArgs, drop_unused

# Gemma3TextConfig's defaults: the multimodal checkpoints' text_config leaves most of them out
TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6, "tie_word_embeddings": True,
}


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), the weight stored as the offset from 1."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class GemmaAttention(Attention):
    norm = RMSNorm


class GemmaBlock(Block):
    attention, norm = GemmaAttention, RMSNorm

    def __init__(self, a: TransformerArgs, layer: int = 0):
        super().__init__(a, layer)
        self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3(DecoderLM):
    def embed(self, tokens: mx.array) -> mx.array:
        h = self.model.embed_tokens(tokens)
        # the scale in the embeddings' dtype, as transformers rounds it (sqrt(3072) is 55.5 in bf16)
        return h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)

    def head(self, hidden: mx.array) -> mx.array:
        logits = super().head(hidden)
        cap = self.config.get("final_logit_softcapping")
        return mx.tanh(logits / cap) * cap if cap else logits


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: a multimodal checkpoint's text_config, Gemma 3's defaults filled in."""
    if config.get("model_type") == "gemma3":
        text = dict(config.get("text_config") or {})
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        for key in ("eos_token_id", "bos_token_id"):
            if key in config:
                text.setdefault(key, config[key])
        config = {**text, "model_type": "gemma3_text"}  # saved as such, it loads as the text model
    config = dict(config)
    for key, value in TEXT_DEFAULTS.items():  # absent, or null where transformers 5 moved it (rope_theta)
        if config.get(key) is None and not (key == "sliding_window" and key in config):
            config[key] = value
    return config


def build(config: dict[str, Any]) -> Gemma3:
    config = text_config(config)
    if config.get("attn_logit_softcapping"):
        raise ModelLoadError("attn_logit_softcapping is set in config.json; stratlm's Gemma 3 runs without it (as every Gemma 3 release does)")
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError("use_bidirectional_attention is set in config.json; stratlm's Gemma 3 is causal only")
    # RoPE: transformers 5 writes rope_parameters per layer type; hub configs rope_theta,
    # rope_local_base_freq and rope_scaling (for the global layers)
    per_type = config.get("rope_parameters") or {}
    full, local = dict(per_type.get("full_attention") or {}), dict(per_type.get("sliding_attention") or {})
    scaling = config.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    layers = config["num_hidden_layers"]
    pattern = config.get("sliding_window_pattern") or 6
    types = config.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    args = TransformerArgs.from_config(
        {**config, "rope_parameters": None},
        qk_norm=True,
        rope_theta=full.get("rope_theta", config["rope_theta"]),
        rope_scaling=scaling,
        sliding_rope_theta=local.get("rope_theta", config["rope_local_base_freq"]),
        sliding_rope_scaling=local if local.get("rope_type", "default") != "default" else None,
        attention_scale=config["query_pre_attn_scalar"] ** -0.5,
        layer_types=tuple(types),
    )
    return Gemma3(config, args, GemmaBlock)


def sanitize(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """A multimodal checkpoint's language model under the text model's names; no vision tower."""
    out = {}
    for key, value in weights.items():
        if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")):
            continue
        for old, new in (("language_model.model.", "model."), ("model.language_model.", "model."), ("language_model.lm_head.", "lm_head.")):
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return drop_unused(out, text_config(config))


# -- GGUF (llama.cpp's gemma3 architecture) -----------------------------------------------------
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], model_type: str) -> dict[str, Any]:
    """What llama.cpp's converter writes, and what its gemma3 graph assumes without writing:
    local layers' RoPE base 10000, five local layers to one global, queries scaled by
    head_dim ** -0.5 except the 27B (hidden_size / heads)."""
    config = llama.gguf_config(meta, weights, "gemma3_text")

    def get(key: str) -> Any:
        value = meta.get(f"gemma3.{key}")
        return value.item() if hasattr(value, "item") else value

    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    config.update(
        sliding_window=get("attention.sliding_window"),
        sliding_window_pattern=6,
        rope_local_base_freq=get("rope.freq_base_swa") or 10000.0,
        query_pre_attn_scalar=hidden // heads if layers == 62 else config["head_dim"],
        final_logit_softcapping=get("final_logit_softcapping"),
        hidden_activation="gelu_pytorch_tanh",
    )
    return config


def undo_norm_shift(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """llama.cpp's converter stores every Gemma norm weight plus 1 (its RMSNorm multiplies by the
    weight): back to the offset from 1 that Gemma's norm (and every other loader) holds. Run by
    the GGUF loader where a converter's changes to the weights are undone (`unpermute_qk`)."""
    return {k: v - 1.0 if k.endswith("norm.weight") else v for k, v in weights.items()}


def gemma_gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A SentencePiece vocabulary (`tokenizer.ggml.model = llama`) read as transformers' GGUF loader
    reads Gemma files (its GemmaTokenizer): no "▁" before the text; tokens that are runs of
    whitespace with a space in them, which llama.cpp writes as the spaces themselves, spelled with
    "▁" (and so left to the merges, not matched whole); and, when the file has no merges, merges
    ranked by the tokens' order in the file, which Gemma's scores do not follow."""
    if str(meta.get("tokenizer.ggml.model", "")) != "llama":
        return gguf_tokenizer(meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    respelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    types = [1 if kind == GGUF_USER_DEFINED and new != old else kind for kind, new, old in zip(token_types(meta, len(tokens)), respelled, tokens)]
    positions = [-float(i) for i in range(len(tokens))]
    respelled_meta = {"tokenizer.ggml.tokens": respelled, "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": positions}
    return sentencepiece_tokenizer({**meta, **respelled_meta, "tokenizer.ggml.add_space_prefix": False})


FAMILY = ModelFamily(
    name="gemma3",
    build=build,
    model_types=("gemma3_text", "gemma3"),
    gguf=GGUFSpec(architectures=("gemma3",), tensor_names=GGUF_NAMES, config=gguf_config, unpermute_qk=undo_norm_shift, tokenizer=gemma_gguf_tokenizer),
    sanitize=sanitize,
)

ALIASES = {
    "gemma-3-270m": "google/gemma-3-270m-it",
    "gemma-3-1b": "google/gemma-3-1b-it",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "gemma-3-12b": "google/gemma-3-12b-it",
}
