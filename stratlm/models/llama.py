"""Llama family (Llama 2/3, SmolLM2), and how its GGUF files read:
llama.cpp's tensor names, the config from the metadata, Llama 3's RoPE frequency factors and the
Q/K rows llama.cpp's converter permutes for ggml's RoPE."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from stratlm.core.errors import ModelLoadError
from stratlm.core.model import GGUFSpec, ModelFamily

from .transformer import DecoderLM, TransformerArgs, drop_unused


def build(config: dict[str, Any]) -> DecoderLM:
    return DecoderLM(config, TransformerArgs.from_config(config))


GGUF_NAMES = {  # llama.cpp's base names -> the Hugging Face Llama layout's
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}



def scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], model_type: str) -> dict[str, Any]:
    arch = str(meta["general.architecture"])

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        return scalar(value) if value is not None else None

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling_type = str(get("rope.scaling.type") or "none")
    if scaling_type not in ("none", "linear"):
        raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported (supported: none, linear); load the Hugging Face folder instead")
    factor = get("rope.scaling.factor")
    rope_scaling = {"rope_type": "linear", "factor": float(factor)} if scaling_type == "linear" and factor and factor != 1 else None
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads if hidden and heads else None),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": scalar(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": scalar(meta.get("tokenizer.ggml.eos_token_id")),
    }


def llama3_rope_scaling(factors: mx.array, config: dict[str, Any], name: str) -> dict[str, Any]:
    """The Hugging Face `rope_scaling` behind a GGUF's `rope_freqs` (llama.cpp stores Llama 3's
    per-frequency factors, not its parameters). Every Llama 3.x release uses low/high frequency
    factors 1 and 4 over 8192 original positions; the factors are checked against those."""
    factor, low, high, old_len = float(factors.max().item()), 1.0, 4.0, 8192
    dims, base = config["head_dim"], config["rope_theta"]
    wavelens = 2 * math.pi * base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    smooth = (old_len / wavelens - low) / (high - low)
    expected = mx.where(wavelens < old_len / high, 1.0, mx.where(wavelens > old_len / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not mx.allclose(factors.astype(mx.float32), expected, rtol=1e-4).item():
        raise ModelLoadError(f"{name} has rope frequency factors that are not Llama 3's (low 1, high 4, 8192 positions); load the Hugging Face folder instead")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": old_len}


def unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (ggml RoPE order -> Hugging Face layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """The q/k projections' rows (weights, and quantized scales and biases) back in the Hugging Face order."""
    weights = dict(weights)
    for i in range(config["num_hidden_layers"]):
        for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            for part in ("weight", "scales", "biases"):
                key = f"model.layers.{i}.self_attn.{proj}.{part}"
                if key in weights:
                    weights[key] = unpermute_rope_rows(weights[key], heads)
    return weights


FAMILY = ModelFamily(
    name="llama",
    build=build,
    model_types=("llama",),
    gguf=GGUFSpec(
        architectures=("llama",),
        tensor_names=GGUF_NAMES,
        config=gguf_config,
        rope_scaling=llama3_rope_scaling,
        unpermute_qk=unpermute_qk,  # llama.cpp's converter permutes Q/K rows for ggml's RoPE
    ),
    sanitize=drop_unused,
)

ALIASES = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
}
