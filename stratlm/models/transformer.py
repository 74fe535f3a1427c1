"""A decoder-only transformer in the Hugging Face layout, shared by the Llama-like families.

Parameter names follow the Hugging Face checkpoints (model.layers.N.self_attn.q_proj, ...),
the same names mlx-lm uses, so checkpoints and adapters move between them and stratlm.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

import attrs
import mlx.core as mx
import mlx.nn as nn

from stratlm.backends.cuda import fused as fused_ops
from stratlm.core.cache import KVCache, RotatingKVCache, StaticKVCache
from stratlm.device import cpu_active
from stratlm.core.errors import ModelLoadError
from stratlm.core.model import Model


@attrs.frozen
class TransformerArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # hooks the other families set (defaults: Llama)
    qkv_bias: bool | None = None  # q/k/v projections' bias (Qwen2: yes, o_proj no); None: attention_bias
    hidden_act: str = "silu"
    attention_scale: float | None = None  # None: head_dim ** -0.5
    partial_rotary_factor: float = 1.0  # the fraction of each head RoPE rotates (Phi-4-mini: 0.75)
    max_position_embeddings: int | None = None
    # sliding-window attention: a layer of type "sliding_attention" sees the last `sliding_window`
    # positions (None: every layer full); its RoPE may have its own base and scaling (Gemma 3)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: dict[str, Any] | None = None
    rope_layers: tuple[bool, ...] | None = None  # per layer whether it rotates (SmolLM3's NoPE layers); None: all

    def window_of(self, layer: int) -> int | None:
        """The layer's attention window (None: full attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope_of(self, layer: int) -> tuple[float, dict[str, Any] | None]:
        """The layer's RoPE base and scaling."""
        if self.sliding_rope_theta is not None and self.layer_types is not None and self.layer_types[layer] == "sliding_attention":
            return self.sliding_rope_theta, self.sliding_rope_scaling
        return self.rope_theta, self.rope_scaling

    @classmethod
    def from_config(cls, config: dict[str, Any], *, qk_norm: bool = False, **overrides: Any) -> "TransformerArgs":
        """The arguments from a Hugging Face config; `overrides` are the family's own (a field
        its config spells differently, or a default its config leaves out)."""
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in config]
        if missing:
            raise ModelLoadError(f"config.json lacks {', '.join(missing)} (needed for model_type {config.get('model_type')!r})")
        # transformers 5 moved rope_theta / rope_scaling into rope_parameters
        rope = dict(config.get("rope_parameters") or {})
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        heads = config["num_attention_heads"]
        limit = config.get("max_position_embeddings")
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if window is not None and limit is not None and window >= limit:
            window = None  # a window as long as the context changes nothing
        layer_types = config.get("layer_types")
        args = cls(
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta") or rope.get("rope_theta") or 10000.0,
            rope_scaling=scaling,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            qk_norm=qk_norm,
            hidden_act=config.get("hidden_act") or config.get("hidden_activation") or "silu",
            partial_rotary_factor=config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0,
            max_position_embeddings=limit,
            sliding_window=window,
            layer_types=tuple(layer_types) if layer_types else None,
        )
        args = attrs.evolve(args, **overrides)
        if args.layer_types is not None and len(args.layer_types) != args.num_hidden_layers:
            raise ModelLoadError(f"config.json has {len(args.layer_types)} layer_types for {args.num_hidden_layers} layers; give one per layer")
        return args


class RoPE(nn.Module):
    """Rotary embedding in the Hugging Face (non-interleaved) layout, with Llama 3 / linear scaling."""

    def __init__(self, dims: int, base: float, scaling: dict[str, Any] | None):
        super().__init__()
        self.dims = dims
        self._rotation_key: tuple | None = None
        self.scale = 1.0
        self.base: float | None = base
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
        self.kind = "longrope" if kind == "su" else kind
        if kind == "llama3":
            self._freqs = self._llama3_periods(dims, base, scaling)
            self.base = None
        elif kind == "linear":
            self.scale = 1.0 / scaling["factor"]
        elif self.kind == "longrope":
            self._longrope(dims, base, scaling)
        elif kind != "default":
            raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, longrope")

    def _longrope(self, dims: int, base: float, s: dict[str, Any]) -> None:
        """Phi-3's LongRoPE, as transformers computes it: per-frequency factors, the short ones
        while a forward's last position is within original_max_position_embeddings and the long
        ones past it; the rotated part scaled by the attention factor."""
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        for name in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if name not in s:
                raise ModelLoadError(f"longrope scaling needs {name} in config.json")
        self._short = mx.array(s["short_factor"], dtype=mx.float32) * periods
        self._long = mx.array(s["long_factor"], dtype=mx.float32) * periods
        self._freqs, self.base = self._short, None
        self.switch_at = int(s["original_max_position_embeddings"])
        factor = s.get("factor") or 1.0
        mscale = s.get("attention_factor")
        self.mscale = mscale if mscale is not None else (1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.switch_at)))

    def _pick_longrope(self, offset: int | mx.array | None, length: int) -> None:
        start = 0 if offset is None else offset if isinstance(offset, int) else int(mx.max(offset).item())
        freqs = self._long if start + length > self.switch_at else self._short
        if freqs is not self._freqs:
            self._freqs, self._rotation_key = freqs, None
            self.pop("_inv_freq", None)

    @staticmethod
    def _llama3_periods(dims: int, base: float, s: dict[str, Any]) -> mx.array:
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s.get("original_max_position_embeddings", 8192)
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # 1 / inv_freq
        wavelens = 2 * math.pi * periods
        periods = mx.where(wavelens > old_len / low, periods * factor, periods)
        medium = (wavelens > old_len / high) & (wavelens < old_len / low)
        smooth = (old_len / wavelens - low) / (high - low)
        return mx.where(medium, periods / ((1 - smooth) / factor + smooth), periods)

    def __call__(self, x: mx.array, offset: int | mx.array | None = None) -> mx.array:
        """offset: the cache's position (None: no cache, position 0). Only cached inference takes
        the CPU tables: a forward without cache may run under mx.compile (training), where
        Python-side reuse would bake one call's tables into the trace."""
        if x.shape[-1] != self.dims:  # partial rotary: the first `dims` of each head turn, the rest pass
            return mx.concatenate([self(x[..., : self.dims], offset), x[..., self.dims :]], axis=-1)
        if self.kind == "longrope":
            self._pick_longrope(offset, x.shape[-2])
        if offset is None:
            return self._rope(x, 0)
        if isinstance(offset, int) and cpu_active():
            tables = self.tables(offset, x.shape[-2], x.dtype)
            if x.shape[-2] == 1:
                return x @ tables
            cos, sin = tables
            return x * cos + (x @ self.swap_halves(x.dtype)) * sin
        return self._rope(x, offset)

    def inv_freq(self) -> mx.array:
        """The per-pair angle rates (float32, dims / 2) fast.rope uses: angle = scale * position * rate."""
        if "_inv_freq" not in self:
            freqs = getattr(self, "_freqs", None)
            if freqs is not None:
                self._inv_freq = (1.0 / freqs).astype(mx.float32)
            else:
                half = self.dims // 2
                self._inv_freq = mx.array([2.0 ** (-(i / half) * math.log2(self.base)) for i in range(half)], dtype=mx.float32)
            mx.eval(self._inv_freq)
        return self._inv_freq

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        freqs = getattr(self, "_freqs", None)
        if getattr(self, "mscale", 1.0) != 1.0:
            x = x * self.mscale
        return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=self.scale, offset=offset, freqs=freqs)

    def tables(self, offset: int, length: int, dtype: mx.Dtype) -> mx.array | tuple[mx.array, mx.array]:
        """What the CPU path needs for `length` positions from `offset`, made once per forward and
        reused by every layer sharing this module. On the CPU fast.rope runs ~20 small ops
        (~150 us) per call. For one position: the rotation as a (dim, dim) matrix M, rope(x) ==
        x @ M (one matmul). For more: the per-position cos and sin, rope(x) == x * cos +
        swap_halves(x) * sin (four ops). Both come from fast.rope applied to the identity, so they
        hold its own angles."""
        key = (offset, length, str(dtype))  # str, not the Dtype: collapse deep-copies models and Dtype does not pickle
        if self._rotation_key != key:
            dim, half = self.dims, self.dims // 2
            basis = mx.broadcast_to(mx.eye(dim, dtype=dtype)[None, :, None, :], (1, dim, length, dim))
            rotations = self._rope(basis, offset)[0].transpose(1, 0, 2)  # (length, dim, dim): x @ rotations[l] at position l
            if length == 1:
                self._rotation = rotations[0]
            else:
                sin = mx.diagonal(rotations[:, :half, half:], axis1=1, axis2=2)
                self._rotation = (mx.diagonal(rotations, axis1=1, axis2=2), mx.concatenate([sin, sin], axis=1))
            self._rotation_key = key
        return self._rotation

    def swap_halves(self, dtype: mx.Dtype) -> mx.array:
        """P with x @ P == concatenate([-x2, x1]) for x = [x1, x2] (exact: one signed 1 a column)."""
        if "_swap" not in self or self._swap.dtype != dtype:
            half = self.dims // 2
            eye = mx.eye(half, dtype=dtype)
            zeros = mx.zeros((half, half), dtype=dtype)
            self._swap = mx.concatenate([mx.concatenate([zeros, eye], axis=1), mx.concatenate([-eye, zeros], axis=1)], axis=0)
        return self._swap


class Attention(nn.Module):
    norm = nn.RMSNorm  # the q/k norm's class (Gemma's scales by 1 + weight)
    qk_norm_per_head = True  # q/k norms over each head (Qwen3, Gemma 3); OLMo 2's span all heads (in qkv)

    def __init__(self, a: TransformerArgs, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.scale = a.attention_scale if a.attention_scale is not None else a.head_dim**-0.5
        self.sliding_window = a.window_of(layer)  # a plain attribute, not a parameter
        self.make_projections(a)
        if a.qk_norm:
            self.q_norm = self.norm(a.head_dim, eps=a.rms_norm_eps)
            self.k_norm = self.norm(a.head_dim, eps=a.rms_norm_eps)
        base, scaling = a.rope_of(layer)
        self.rope = RoPE(int(a.head_dim * a.partial_rotary_factor), base, scaling)
        self.use_rope = a.rope_layers is None or bool(a.rope_layers[layer])  # a plain attribute

    def make_projections(self, a: TransformerArgs) -> None:
        qkv_bias = a.attention_bias if a.qkv_bias is None else a.qkv_bias
        self.q_proj = nn.Linear(a.hidden_size, a.num_attention_heads * a.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_key_value_heads * a.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_key_value_heads * a.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(a.num_attention_heads * a.head_dim, a.hidden_size, bias=a.attention_bias)

    def qkv(self, x: mx.array) -> list[mx.array]:
        """The queries, keys and values of x, (B, L, heads * head_dim) each."""
        return project(self, x, ("q_proj", "k_proj", "v_proj"))

    def fuse_projections(self) -> None:
        fuse_linears(self, ("q_proj", "k_proj", "v_proj"))

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if "q_norm" in self and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        if self.use_rope:
            offset = cache.rope_offset if cache is not None else None
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if L == 1 and not isinstance(mask, str) and cpu_active():
            out = decode_attention(q, k, v, self.scale, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """Attention of one query position, as plain ops: on the CPU mx.fast's attention falls back
    to a longer chain of small ops (~85 us vs ~55 us a layer); the GPU keeps its fused kernel.
    q (B, H, 1, D); k, v (B, H_kv, S, D); mask None or boolean, broadcastable to (B, 1, 1, S)."""
    B, H, _, D = q.shape
    groups = k.shape[1]
    q = q.reshape(B, groups, H // groups, D)  # the query heads of one KV head are adjacent
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    return (mx.softmax(scores, axis=-1, precise=True) @ v).reshape(B, H, 1, -1)


ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu_pytorch_tanh": nn.gelu_approx, "gelu_new": nn.gelu_approx, "gelu": nn.gelu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported hidden_act {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    def __init__(self, a: TransformerArgs, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or a.intermediate_size
        activation(a.hidden_act)  # checked now
        self.act_name = a.hidden_act  # the name, not the function (MLX's compiled functions do not deep-copy)
        self.make_projections(a, inter)

    def make_projections(self, a: TransformerArgs, inter: int) -> None:
        self.gate_proj = nn.Linear(a.hidden_size, inter, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, inter, bias=a.mlp_bias)
        self.down_proj = nn.Linear(inter, a.hidden_size, bias=a.mlp_bias)

    def gate_up(self, x: mx.array) -> list[mx.array]:
        return project(self, x, ("gate_proj", "up_proj"))

    def fuse_projections(self) -> None:
        fuse_linears(self, ("gate_proj", "up_proj"))

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_up(x)
        return self.down_proj(ACTIVATIONS[self.act_name](gate) * up)


# -- fused projections: an inference-time layout that keeps the Hugging Face names -------------
def fuse_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Stack these bias-free Linear layers' weights into one matrix and make each layer's weight
    a row slice (a view) of it: one matmul then computes all of them, no memory is duplicated,
    and parameter names, adapters and what save_model writes stay as they were. Layers that were
    replaced (wrapped, quantized, biased) are left alone."""
    layers = [getattr(module, n) for n in names]
    if not all(type(layer) is nn.Linear and "bias" not in layer for layer in layers):
        return
    fused = mx.concatenate([layer.weight for layer in layers], axis=0)
    mx.eval(fused)
    views, start = [], 0
    for layer in layers:
        rows = layer.weight.shape[0]
        views.append(fused[start : start + rows])
        start += rows
    fused_t = fused.T
    mx.eval(views, fused_t)
    for layer, view in zip(layers, views):
        layer.weight = view
    # "_": not a parameter. fused_t is an evaluated view: `x @ fused_t` is one graph node;
    # the split points cut its output back into the layers' outputs
    splits = tuple(int(sum(v.shape[0] for v in views[: i + 1])) for i in range(len(views) - 1))
    module._fused = (fused_t, tuple(views), splits, fused)


def fused_intact(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether the named layers are still the plain Linears whose weights are the fused views
    (training, set_dtype, adapters and transforms replace them)."""
    views = module["_fused"][1]
    for name, view in zip(names, views):
        layer = module.get(name)
        if type(layer) is not nn.Linear or layer.get("weight") is not view:
            return False
    return True


def transposed_weight(layer: nn.Module) -> mx.array:
    """layer.weight.T as an evaluated view (a leaf, not a graph node per call), kept while the
    weight is the same array."""
    weight = layer["weight"]
    cached = layer.get("_weight_t")
    if cached is None or cached[0] is not weight:
        weight_t = weight.T
        mx.eval(weight_t)
        layer["_weight_t"] = cached = (weight, weight_t)
    return cached[1]


def project(module: nn.Module, x: mx.array, names: tuple[str, ...]) -> list[mx.array]:
    """The named projections of x: one matmul while the fused layout is intact, else one each."""
    fused = module.get("_fused")
    if fused is not None:
        weight_t, _, splits, _ = fused
        if fused_intact(module, names):
            return mx.split(x @ weight_t, list(splits), axis=-1)
        module.pop("_fused")  # a weight was replaced (training, set_dtype, a transform): drop the stale copy
    return [getattr(module, n)(x) for n in names]


# Prompts (more positions than a decode step or a speculative verify window) and many rows take
# the ordinary graph: compute-bound there, it is as fast, and its ~37 nodes a layer keep fewer
# activations alive per GPU command batch (MLX frees a batch's buffers when it completes; with
# 9-14 nodes a layer a batch spans ~3x the layers). Measured: batch 64 x 64 prompt tokens peaked
# 1.2 GB higher through the fused path.
FUSED_MAX_POSITIONS = 16
FUSED_MAX_ROWS = 1024


class BlockPlan(NamedTuple):
    """A block's arrays for DecoderLM.fused_forward: weights as (out, in) for the gemv kernels and
    as evaluated transposed views (`_t`) for matmuls."""

    input_norm: mx.array
    input_eps: float
    qkv_t: mx.array
    qkv: mx.array
    qk_norm: tuple  # (q_norm weight, k_norm weight, eps), or (None, None, eps) without q/k norm
    o_t: mx.array
    o: mx.array
    post_norm: mx.array
    post_eps: float
    gate_up_t: mx.array
    gate_up: mx.array
    down_t: mx.array
    down: mx.array


class Block(nn.Module):
    attention, norm = Attention, nn.RMSNorm  # what a family's block subclass may swap

    def __init__(self, a: TransformerArgs, layer: int = 0):
        super().__init__()
        self.self_attn = self.attention(a, layer)
        self.mlp = self.make_mlp(a, layer)
        self.input_layernorm = self.norm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = self.norm(a.hidden_size, eps=a.rms_norm_eps)

    def make_mlp(self, a: TransformerArgs, layer: int) -> nn.Module:
        return MLP(a)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def fused_plan(self) -> BlockPlan | None:
        """What `DecoderLM.fused_forward` needs from this block, or None when the block is not in
        the fused layout (optimize_for_inference not run, or since changed: adapters, training)."""
        attn, mlp = self.get("self_attn"), self.get("mlp")
        if type(attn) is not Attention or type(mlp) is not MLP or "_fused" not in attn or "_fused" not in mlp:
            return None
        # the fused kernels compute full attention at the default scale, whole-head RoPE and SwiGLU
        if (attn.sliding_window is not None or attn.scale != attn.head_dim**-0.5 or not attn.use_rope or attn.rope.dims != attn.head_dim
                or attn.rope.kind == "longrope" or mlp.act_name not in ("silu", "swish")):
            return None
        if not fused_intact(attn, ("q_proj", "k_proj", "v_proj")) or not fused_intact(mlp, ("gate_proj", "up_proj")):
            return None
        o_proj, down_proj = attn.get("o_proj"), mlp.get("down_proj")
        norms = [self.get("input_layernorm"), self.get("post_attention_layernorm")]
        if "q_norm" in attn:
            norms += [attn["q_norm"], attn["k_norm"]]
        if type(o_proj) is not nn.Linear or type(down_proj) is not nn.Linear or "bias" in o_proj or "bias" in down_proj:
            return None
        if any(type(n) is not nn.RMSNorm for n in norms):
            return None
        qk_norm = (attn["q_norm"].weight, attn["k_norm"].weight, attn["q_norm"].eps) if "q_norm" in attn else (None, None, 1e-6)
        (qkv_t, *_, qkv), (gate_up_t, *_, gate_up) = attn["_fused"], mlp["_fused"]
        return BlockPlan(norms[0].weight, norms[0].eps, qkv_t, qkv, qk_norm, transposed_weight(o_proj), o_proj.weight,
                         norms[1].weight, norms[1].eps, gate_up_t, gate_up, transposed_weight(down_proj), down_proj.weight)


class Backbone(nn.Module):
    def __init__(self, a: TransformerArgs, block: type[Block] = Block):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [block(a, i) for i in range(a.num_hidden_layers)]
        # one RoPE for all layers of a kind: its per-position rotation is made once a step
        shared: dict[tuple, RoPE] = {}
        for i, layer in enumerate(self.layers):
            rope = layer.self_attn.rope
            layer.self_attn.rope = shared.setdefault((rope.dims, *map(repr, a.rope_of(i))), rope)
        self.norm = block.norm(a.hidden_size, eps=a.rms_norm_eps)


class DecoderLM(Model):
    """model.{embed_tokens, layers, norm} + lm_head (absent when tied to the embeddings)."""

    sliding_window_attention = True  # windowed layers get a RotatingKVCache and banded masks

    def __init__(self, config: dict[str, Any], args: TransformerArgs, block: type[Block] = Block):
        super().__init__()
        self.config = dict(config)
        self.args = args
        self.model = Backbone(args, block)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def set_layers(self, blocks: list[nn.Module]) -> None:
        self.model.layers = list(blocks)
        self.config["num_hidden_layers"] = len(blocks)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    def optimize_for_inference(self) -> None:
        """Fuse the q/k/v and gate/up projections (see fuse_linears); names stay the same. On
        CUDA this enables `fused_forward` (the Engine calls this there); elsewhere it is opt-in:
        the logits move by float rounding (~1e-6) and the CPU gained nothing measurable."""
        for block in self.layers:
            for part in (getattr(block, "self_attn", None), getattr(block, "mlp", None)):
                if hasattr(part, "fuse_projections"):
                    part.fuse_projections()

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if cache is not None and "_fused_plans" in self and fused_ops.cuda_active():
            logits = self.fused_forward(tokens, cache)
            if logits is not None:
                return logits
        return super().__call__(tokens, cache)

    def windows(self) -> list[int | None]:
        """Each layer's attention window (None: full attention)."""
        return [getattr(block.get("self_attn"), "sliding_window", None) if isinstance(block, nn.Module) else None for block in self.layers]

    def make_cache(self, left_padding=None) -> list[KVCache]:
        # each generation starts here: take the fused layout's plan now, not every step
        self._fused_plans = self.fused_plans()
        return [RotatingKVCache(w, left_padding) if w else KVCache(left_padding) for w in self.windows()]

    def attention_masks(self, n_new: int, cache: list[KVCache] | None) -> list[mx.array | str | None]:
        """Per layer: a sliding-window layer's mask comes from its own cache (or the banded
        causal mask without one); layers of the same window share one."""
        made: dict[int | None, mx.array | str | None] = {}
        masks = []
        for i, window in enumerate(self.windows()):
            if window not in made:
                if cache:
                    made[window] = cache[i].make_mask(n_new)
                else:
                    made[window] = sliding_causal_mask(n_new, window)
            masks.append(made[window])
        return masks

    def compiled_decoding_pays(self) -> bool:
        # on CUDA in the fused layout: the trace replays the fused graph without Python building
        # it, and attention reads the static cache up to the position held in an array (measured
        # in docs/benchmarks.md); elsewhere the plain forward is as fast or faster
        return self.get("_fused_plans") is not None and fused_ops.cuda_active()

    def fused_plans(self) -> tuple | None:
        """Per block what `fused_forward` needs (Block.fused_plan), and the final norm and head;
        None unless every block is in the fused layout."""
        plans = []
        for block in self.layers:  # stops at the first block out of the layout
            plan = block.fused_plan() if type(block) is Block else None
            if plan is None:
                return None
            plans.append(plan)
        final_norm, head = self.model.get("norm"), self.get("lm_head", self.model.get("embed_tokens"))
        if not plans or type(final_norm) is not nn.RMSNorm:
            return None
        if type(head) not in (nn.Linear, nn.Embedding) or "bias" in head:
            return None
        attn = self.layers[0].self_attn
        shapes = (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.scale, attn.rope)
        return tuple(plans), shapes, final_norm.weight, final_norm.eps, transposed_weight(head)

    def fused_forward(self, tokens: mx.array, cache: list[KVCache], ops: fused_ops.FusedOps | None = None) -> mx.array | None:
        """The cached forward in 5 graph nodes a layer (a few rows: decoding) or 14 (more) instead
        of ~37 (core/fused.py: on CUDA the residual add, the norm, the q/k/v projection, q/k norm
        and RoPE in one kernel; the cache write and attention in one; the other add, norm,
        gate/up projection and SwiGLU in another; matmuls against evaluated transposed views for
        many rows). Same logits as __call__ up to float rounding. None when the model is not in
        the fused layout (optimize_for_inference). `ops`: the implementations (default: CUDA
        kernels on CUDA, plain MLX ops elsewhere).
        The plan is taken when the cache is made (make_cache), so a model changed during one
        generation (weights replaced, adapters added) is seen at the next."""
        if not cache or type(cache[0]) not in (KVCache, StaticKVCache):
            return None
        plan = self.get("_fused_plans")
        if plan is None:
            return None
        plans, (n_heads, n_kv_heads, head_dim, scale, rope), final_w, final_eps, head_t = plan
        B, L = tokens.shape
        if L > FUSED_MAX_POSITIONS or B * L > FUSED_MAX_ROWS:
            return None
        offset = cache[0].rope_offset
        offsets = mx.array([offset] * B, dtype=mx.int32) if isinstance(offset, int) else mx.broadcast_to(offset, (B,)).astype(mx.int32)
        inv_freq, rope_scale = rope.inv_freq(), rope.scale
        h = self.embed(tokens)
        ops = ops or fused_ops.ops_for(h.dtype)
        hidden, inter = h.shape[-1], plans[0].down.shape[1]
        # a few rows (decoding): the norm, the projection and SwiGLU each in one gemv kernel
        few = ops.gemv_fits(B * L, (hidden, n_heads * head_dim, inter), h.dtype, head_dim)
        if few:  # attention writes the cache's storage and reads it up to each row's length: no mask, no slices
            padding = cache[0].left_padding
            starts = padding if padding is not None else _zeros_int32(B)
        else:
            mask = cache[0].make_mask(L)
        delta = None
        for plan, layer_cache in zip(plans, cache):
            in_w, in_eps, qkv_t, qkv_w, (q_w, k_w, qk_eps), o_t, o_w, post_w, post_eps, gate_up_t, gate_up_w, down_t, down_w = plan
            if few:
                h, q, k, v = ops.norm_gemv_heads(h, delta, in_w, in_eps, qkv_w, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_w, k_w, qk_eps)
                keys, values = layer_cache.make_room(k, v)
                out, layer_cache.keys, layer_cache.values = ops.attention_cached(q, k, v, keys, values, offsets, starts, scale)
                # out (B, L, H, D): B * L rows of H * D, as the projection reads them
                out = ops.gemv(out, o_w, (B, L, hidden))
                h, act = ops.norm_gemv(h, out, post_w, post_eps, gate_up_w, True)
                delta = ops.gemv(act, down_w, (B, L, hidden))
            else:
                h, y = (h, mx.fast.rms_norm(h, in_w, in_eps)) if delta is None else ops.add_rms_norm(h, delta, in_w, in_eps)
                q, k, v = ops.attention_heads(y @ qkv_t, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_w, k_w, qk_eps)
                k, v = layer_cache.update_and_fetch(k, v)
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
                out = out.reshape(B, 1, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)
                h, y = ops.add_rms_norm(h, out @ o_t, post_w, post_eps)
                delta = ops.swiglu(y @ gate_up_t) @ down_t
        _, y = ops.add_rms_norm(h, delta, final_w, final_eps)
        return y @ head_t

    def head(self, hidden: mx.array) -> mx.array:
        hidden = self.model.norm(hidden)
        if "lm_head" in self:
            return self.lm_head(hidden)
        return self.model.embed_tokens.as_linear(hidden)


def sliding_causal_mask(n: int, window: int | None) -> mx.array | str | None:
    """Causal attention of n positions, each seeing at most `window` (itself included)."""
    if window is None or n <= window:
        return "causal" if n > 1 else None
    distance = mx.arange(n)[:, None] - mx.arange(n)[None, :]
    return (distance >= 0) & (distance < window)


@lru_cache(maxsize=64)
def _zeros_int32(n: int) -> mx.array:
    """No left padding for n rows (shared: arrays are immutable, and one made per step costs a node)."""
    zeros = mx.zeros((n,), dtype=mx.int32)
    mx.eval(zeros)
    return zeros


def drop_unused(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """Checkpoint keys no model uses: precomputed rotary tables, a tied head stored anyway."""
    out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.get("tie_word_embeddings", False):
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    return out
