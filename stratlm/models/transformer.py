"""A decoder-only transformer in the Hugging Face layout, shared by the Llama-like families.

Parameter names follow the Hugging Face checkpoints (model.layers.N.self_attn.q_proj, ...),
the same names mlx-lm uses, so checkpoints and adapters move between them and stratlm.
This is the reference; a device's own path plugs in from its backend (DecoderLM.fast_forward,
set on CUDA by backends/cuda/decoder.install) and does not live here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, TypeVar

import attrs
import mlx.core as mx
import mlx.nn as nn

from stratlm.core.cache import KVCache, RotatingKVCache
from stratlm.device import cpu_active
from stratlm.core.errors import ModelLoadError
from stratlm.core.model import Model

from .fused_layout import fuse_linears, project


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


class FastForward(Protocol):
    """A backend's own cached forward for a DecoderLM, installed as its `fast_forward` by the
    device policy (on CUDA: backends/cuda/decoder.py's fused decode path)."""

    def prepare(self, model: "DecoderLM") -> None:
        """Called when the model makes a cache (each generation starts there)."""

    def __call__(self, model: "DecoderLM", tokens: mx.array, cache: list[KVCache]) -> mx.array | None:
        """The logits, or None where the model's own forward should run."""

    def compiled_decoding_pays(self) -> bool:
        """The model's answer to Model.compiled_decoding_pays."""


PlanT = TypeVar("PlanT")


def plan_blocks(model: "DecoderLM", block_plan: Callable[[nn.Module], PlanT | None]) -> tuple[PlanT, ...] | None:
    """A backend's plan of each block in order (`block_plan`), or None at the first block it
    does not take: a fast forward runs every block or none."""
    plans = []
    for block in model.layers:
        plan = block_plan(block)
        if plan is None:
            return None
        plans.append(plan)
    return tuple(plans)


class DecoderLM(Model):
    """model.{embed_tokens, layers, norm} + lm_head (absent when tied to the embeddings)."""

    sliding_window_attention = True  # windowed layers get a RotatingKVCache and banded masks
    fast_forward: FastForward | None = None  # a plain attribute (not a module or parameter), set by a backend

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
        """Fuse the q/k/v and gate/up projections (fused_layout.fuse_linears); names stay the
        same. On CUDA the Engine does this, and installs the fused decode path over it
        (backends/cuda/decoder.install); elsewhere it is opt-in: the logits move by float rounding
        (~1e-6) and the CPU gained nothing measurable."""
        for block in self.layers:
            for part in (getattr(block, "self_attn", None), getattr(block, "mlp", None)):
                if hasattr(part, "fuse_projections"):
                    part.fuse_projections()

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if cache is not None and self.fast_forward is not None:
            logits = self.fast_forward(self, tokens, cache)
            if logits is not None:
                return logits
        return super().__call__(tokens, cache)

    def windows(self) -> list[int | None]:
        """Each layer's attention window (None: full attention)."""
        return [getattr(block.get("self_attn"), "sliding_window", None) if isinstance(block, nn.Module) else None for block in self.layers]

    def make_cache(self, left_padding=None) -> list[KVCache]:
        if self.fast_forward is not None:  # each generation starts here: the backend plans now, not every step
            self.fast_forward.prepare(self)
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
        return self.fast_forward is not None and self.fast_forward.compiled_decoding_pays()

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


def drop_unused(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """Checkpoint keys no model uses: precomputed rotary tables, a tied head stored anyway."""
    out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.get("tie_word_embeddings", False):
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    return out
