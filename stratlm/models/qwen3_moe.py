"""Qwen3-MoE family (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 block whose MLP is a set of
experts, of which a router picks the top k per token (softmax over experts, then the top k,
renormalized with norm_topk_prob). The experts' weights are stacked (experts, out, in) and run
through MLX's gather matmuls (`gather_mm`, `gather_qmm` when quantized), so only the chosen
experts are computed. Parameter names are mlx-lm's (`mlp.gate`, `mlp.switch_mlp.*`); a Hugging
Face checkpoint's per-expert weights (`mlp.experts.N.*`) are stacked at load."""

from __future__ import annotations

import math
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from stratlm.core.errors import ModelLoadError
from stratlm.core.model import GGUFSpec, ModelFamily

from .llama import GGUF_NAMES, gguf_config
from .qwen2 import layer_types
from .transformer import MLP, Block, DecoderLM, TransformerArgs, drop_unused

SORT_FROM = 64  # (token, expert) pairs from which they are sorted by expert: each expert's rows read together


class SwitchLinear(nn.Module):
    """One Linear per expert, weights stacked (experts, out, in); row i uses expert indices[i]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedSwitchLinear":
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices, transpose=True,
                             group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)


class SwitchGLU(nn.Module):
    """The experts' SwiGLU MLPs: x (..., hidden), indices (..., k) -> (..., k, hidden)."""

    def __init__(self, hidden: int, inter: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden, inter, num_experts)
        self.up_proj = SwitchLinear(hidden, inter, num_experts)
        self.down_proj = SwitchLinear(inter, hidden, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, hidden): one row a token, broadcast over its k experts
        indices = mx.stop_gradient(indices)
        sort = indices.size >= SORT_FROM
        idx = indices
        if sort:  # many tokens (a prompt): group the (token, expert) pairs by expert
            k = indices.shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            unsort = mx.argsort(order)
            x, idx = x.flatten(0, -3)[order // k], flat[order]
        h = nn.silu(self.gate_proj(x, idx, sort)) * self.up_proj(x, idx, sort)
        y = self.down_proj(h, idx, sort)
        if sort:
            y = mx.unflatten(y[unsort], 0, indices.shape)
        return y.squeeze(-2)


class SparseMoE(nn.Module):
    def __init__(self, a: TransformerArgs, num_experts: int, top_k: int, inter: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(a.hidden_size, num_experts, bias=False)
        self.switch_mlp = SwitchGLU(a.hidden_size, inter, num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1, precise=True)
        k = self.top_k
        chosen = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = self.switch_mlp(x, chosen)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


class MoEBlock(Block):
    def __init__(self, a: TransformerArgs, layer: int = 0, moe: dict[str, Any] | None = None):
        self._moe = moe
        super().__init__(a, layer)

    def make_mlp(self, a: TransformerArgs, layer: int) -> nn.Module:
        m = self._moe
        sparse = layer not in m["mlp_only_layers"] and m["num_experts"] > 0 and (layer + 1) % m["decoder_sparse_step"] == 0
        if not sparse:
            return MLP(a)
        return SparseMoE(a, m["num_experts"], m["num_experts_per_tok"], m["moe_intermediate_size"], m["norm_topk_prob"])


def moe_config(config: dict[str, Any]) -> dict[str, Any]:
    experts = config.get("num_experts", config.get("num_local_experts"))
    missing = [k for k, v in (("num_experts (or num_local_experts)", experts), ("num_experts_per_tok", config.get("num_experts_per_tok")),
                              ("moe_intermediate_size", config.get("moe_intermediate_size"))) if v is None]
    if missing:
        raise ModelLoadError(f"config.json lacks {', '.join(missing)} (needed for model_type {config.get('model_type')!r})")
    return {
        "num_experts": int(experts),
        "num_experts_per_tok": int(config["num_experts_per_tok"]),
        "moe_intermediate_size": int(config["moe_intermediate_size"]),
        "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
        "decoder_sparse_step": int(config.get("decoder_sparse_step") or 1),
        "mlp_only_layers": set(config.get("mlp_only_layers") or []),
    }


def build(config: dict[str, Any]) -> DecoderLM:
    moe = moe_config(config)

    class Qwen3MoEBlock(MoEBlock):
        def __init__(self, a: TransformerArgs, layer: int = 0):
            super().__init__(a, layer, moe)

    config = {**config, "use_sliding_window": config.get("use_sliding_window", False)}
    return DecoderLM(config, TransformerArgs.from_config(config, qk_norm=True, layer_types=layer_types(config)), Qwen3MoEBlock)


EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")


def sanitize(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """Per-expert weights (Hugging Face) or transformers 5's fused gate_up_proj / down_proj,
    stacked into switch_mlp's (experts, out, in)."""
    out: dict[str, mx.array] = {}
    groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    for key, value in weights.items():
        m = EXPERT.match(key)
        if m:
            groups.setdefault((m[1], m[3], m[4]), {})[int(m[2])] = value
        elif key.endswith(".mlp.experts.gate_up_proj"):
            prefix, half = key[: -len(".experts.gate_up_proj")], value.shape[1] // 2
            out[f"{prefix}.switch_mlp.gate_proj.weight"] = value[:, :half]
            out[f"{prefix}.switch_mlp.up_proj.weight"] = value[:, half:]
        elif key.endswith(".mlp.experts.down_proj"):
            out[f"{key[: -len('.experts.down_proj')]}.switch_mlp.down_proj.weight"] = value
        else:
            out[key] = value
    for (prefix, proj, part), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ModelLoadError(f"{prefix}.experts has experts {sorted(experts)}; expected 0..{len(experts) - 1}")
        out[f"{prefix}.switch_mlp.{proj}.{part}"] = mx.stack([experts[i] for i in range(len(experts))])
    return drop_unused(out, config)


GGUF_MOE_NAMES = {  # llama.cpp's expert tensors are stacked (experts, out, in) already
    **GGUF_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}


def moe_gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], model_type: str) -> dict[str, Any]:
    config = gguf_config(meta, weights, model_type)
    arch = str(meta["general.architecture"])

    def get(key: str) -> Any:
        value = meta.get(f"{arch}.{key}")
        return value.item() if hasattr(value, "item") else value

    config.update(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                  moe_intermediate_size=get("expert_feed_forward_length"), norm_topk_prob=True)
    return config


FAMILY = ModelFamily(
    name="qwen3_moe",
    build=build,
    model_types=("qwen3_moe",),
    gguf=GGUFSpec(architectures=("qwen3moe",), tensor_names=GGUF_MOE_NAMES, config=moe_gguf_config),
    sanitize=sanitize,
)

ALIASES = {
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-30b-a3b-instruct": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "qwen3-30b-a3b-4bit": "mlx-community/Qwen3-30B-A3B-4bit",
}
