"""The fused decode path: the reference model's cached forward (models/transformer.py) in 5 graph
nodes a layer (one sequence) or ~11 (several rows) instead of ~37, with fused.py's ops.

The reference model stays as it reads; the device policy (the Engine, on CUDA) calls `install`,
which puts the model in the fused-projection layout (optimize_for_inference) and sets a
`FusedDecoder` as its `fast_forward`. DecoderLM consults that when called with a cache: the
decoder takes a plan of the model's arrays when a cache is made (make_cache: each generation
starts there) and runs the forward from it, or answers None (prompts, many rows, a model out of
the layout, not on CUDA) and the reference forward runs.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from stratlm.backends.cuda import fused as fused_ops
from stratlm.core.cache import KVCache, StaticKVCache
from stratlm.core.model import Model
from stratlm.models.fused_layout import fused_intact
from stratlm.models.transformer import MLP, Attention, Block, DecoderLM, plan_blocks

# Prompts (more positions than a decode step or a speculative verify window) and many rows take
# the ordinary graph: compute-bound there, it is as fast, and its ~37 nodes a layer keep fewer
# activations alive per GPU command batch (MLX frees a batch's buffers when it completes; with
# 9-14 nodes a layer a batch spans ~3x the layers). Measured: batch 64 x 64 prompt tokens peaked
# 1.2 GB higher through the fused path.
FUSED_MAX_POSITIONS = 16
FUSED_MAX_ROWS = 1024


class BlockPlan(NamedTuple):
    """A block's arrays for the fused forward: weights as (out, in) for the gemv kernels and
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


def block_plan(block: nn.Module) -> BlockPlan | None:
    """What the fused forward needs from this block, or None when the block is not the reference
    Block in the fused layout (optimize_for_inference not run, or since changed: adapters, training)."""
    if type(block) is not Block:
        return None
    attn, mlp = block.get("self_attn"), block.get("mlp")
    if type(attn) is not Attention or type(mlp) is not MLP or "_fused" not in attn or "_fused" not in mlp:
        return None
    # the fused kernels compute full attention at the default scale, whole-head RoPE and SwiGLU
    if (attn.sliding_window is not None or attn.scale != attn.head_dim**-0.5 or not attn.use_rope or attn.rope.dims != attn.head_dim
            or attn.rope.kind == "longrope" or mlp.act_name not in ("silu", "swish")):
        return None
    if not fused_intact(attn, ("q_proj", "k_proj", "v_proj")) or not fused_intact(mlp, ("gate_proj", "up_proj")):
        return None
    o_proj, down_proj = attn.get("o_proj"), mlp.get("down_proj")
    norms = [block.get("input_layernorm"), block.get("post_attention_layernorm")]
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


def model_plan(model: DecoderLM) -> tuple | None:
    """Per block what the fused forward needs (block_plan), and the final norm and head; None
    unless every block is in the fused layout."""
    plans = plan_blocks(model, block_plan)
    final_norm, head = model.model.get("norm"), model.get("lm_head", model.model.get("embed_tokens"))
    if not plans or type(final_norm) is not nn.RMSNorm:
        return None
    if type(head) not in (nn.Linear, nn.Embedding) or "bias" in head:
        return None
    attn = model.layers[0].self_attn
    shapes = (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.scale, attn.rope)
    return tuple(plans), shapes, final_norm.weight, final_norm.eps, transposed_weight(head)


class FusedDecoder:
    """A DecoderLM's `fast_forward` (see models/transformer.FastForward): the plan is taken when
    the cache is made (`prepare`, from make_cache), so a model changed during one generation
    (weights replaced, adapters added) is seen at the next."""

    def __init__(self) -> None:
        self.plan: tuple | None = None

    def prepare(self, model: DecoderLM) -> None:
        self.plan = model_plan(model)

    def __call__(self, model: DecoderLM, tokens: mx.array, cache: list[KVCache]) -> mx.array | None:
        return self.forward(model, tokens, cache) if fused_ops.cuda_active() else None

    def compiled_decoding_pays(self) -> bool:
        # on CUDA in the fused layout: the trace replays the fused graph without Python building
        # it, and attention reads the static cache up to the position held in an array (measured
        # in docs/benchmarks.md); elsewhere the plain forward is as fast or faster
        return self.plan is not None and fused_ops.cuda_active()

    def forward(self, model: DecoderLM, tokens: mx.array, cache: list[KVCache], ops: fused_ops.FusedOps | None = None) -> mx.array | None:
        """The cached forward (on CUDA the residual add, the norm, the q/k/v projection, q/k norm
        and RoPE in one kernel; the cache write and attention in one; the other add, norm,
        gate/up projection and SwiGLU in another; matmuls against evaluated transposed views for
        many rows). Same logits as the model's own forward up to float rounding. None when the
        model is not in the fused layout or the input is a prompt or many rows. `ops`: the
        implementations (default: CUDA kernels on CUDA, plain MLX ops elsewhere)."""
        if not cache or type(cache[0]) not in (KVCache, StaticKVCache):
            return None
        plan = self.plan
        if plan is None:
            return None
        plans, (n_heads, n_kv_heads, head_dim, scale, rope), final_w, final_eps, head_t = plan
        B, L = tokens.shape
        if L > FUSED_MAX_POSITIONS or B * L > FUSED_MAX_ROWS:
            return None
        offset = cache[0].rope_offset
        offsets = mx.array([offset] * B, dtype=mx.int32) if isinstance(offset, int) else mx.broadcast_to(offset, (B,)).astype(mx.int32)
        inv_freq, rope_scale = rope.inv_freq(), rope.scale
        h = model.embed(tokens)
        ops = ops or fused_ops.ops_for(h.dtype)
        hidden, inter = h.shape[-1], plans[0].down.shape[1]
        # one sequence: the norm, the projection and SwiGLU each in one gemv kernel. The gemv
        # kernels are compiled per row count (their accumulators live in registers), so a batch
        # whose rows come and go (the scheduler) would compile a set for each count it passes
        # through; several rows take the matmuls
        few = B == 1 and ops.gemv_fits(L, (hidden, n_heads * head_dim, inter), h.dtype, head_dim)
        # attention writes the cache's storage and reads it up to each row's length: no mask, no
        # slices, and the same graph whatever the cache's length (a mask of a new shape each step
        # cost MLX's CUDA attention far more than the step itself: docs/benchmarks.md)
        starts = cache[0].row_starts(B)
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
                keys, values = layer_cache.make_room(k, v)
                out, layer_cache.keys, layer_cache.values = ops.attention_cached(q, k, v, keys, values, offsets, starts, scale)
                h, y = ops.add_rms_norm(h, out.reshape(B, L, -1) @ o_t, post_w, post_eps)
                delta = ops.swiglu(y @ gate_up_t) @ down_t
        _, y = ops.add_rms_norm(h, delta, final_w, final_eps)
        return y @ head_t


def install(model: Model) -> FusedDecoder | None:
    """Put the model in the fused-projection layout (optimize_for_inference) and, for a DecoderLM,
    give it the fused decode path; returns the decoder (None: the model is not a DecoderLM, and
    keeps its own forward). The path applies where the blocks are the reference Block in that
    layout; a family's own blocks (sliding windows, MoE, ...) take the reference forward."""
    model.optimize_for_inference()
    if not isinstance(model, DecoderLM):
        return None
    model.fast_forward = FusedDecoder()
    return model.fast_forward
