"""The CPU kernels' decode path: the reference model's cached forward with each block as one
graph node (kernels.decode_block) instead of ~60.

On MLX's CPU stream every graph node costs several microseconds of host work, and a small
model's decode step is mostly such nodes: the norms, RoPE, the cache update, attention and
SwiGLU around the seven quantized products of each block. decode_block does all of a block in
C++ with the products on the same quantized kernels (and the same exact / int8 setting).

The reference model stays as it reads; the Engine calls `install` on the CPU, which sets a
`KernelDecoder` as the model's `fast_forward` when its blocks run on the kernels
(backends/cpu/quantized.use_cpu_kernels). DecoderLM consults it when called with a cache: the
decoder takes a plan of the model's arrays when a cache is made (make_cache: each generation
starts there) and runs the forward from it, or answers None (many rows, a block out of the
plan's shape, off the CPU) and the reference forward runs. Prompts take it too, a chunk of the
prompt (loop.PREFILL_CHUNK) at a time: the products then take the kernels' GEMM path from its
row count on, and the ~60 nodes a block the reference graph would run cost more than the
decode path's per-row attention loop.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from stratlm.backends.cpu import kernels
from stratlm.backends.cpu.quantized import KernelQuantizedLinear, kernel_scales, supported
from stratlm.core.cache import KVCache
from stratlm.core.model import Model
from stratlm.device import cpu_active
from stratlm.models.transformer import MLP, Attention, Block, DecoderLM, plan_blocks

# Positions and rows (batch x positions) a forward takes: decode steps, verify windows and a
# prompt's chunks (PREFILL_CHUNK), one row or a few. More rows (a batch of prompts) take the
# reference forward: decode_block keeps its scratch at the largest size seen, rows x the widths.
MAX_POSITIONS = 512
MAX_ROWS = 512

PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)  # decode_block's order


def block_plan(block: nn.Module) -> object | None:
    """The block's weights as decode_block holds them (the extension's BlockWeights: its norm
    weights and the projections' arrays, checked and evaluated once), or None when it computes
    something else: not the
    reference Block, a projection not on the kernels (dense, adapted) or with a bias, q/k norms,
    a sliding window, partial or LongRoPE rotation, no rotation, another activation."""
    if type(block) is not Block:
        return None
    attn, mlp = block.get("self_attn"), block.get("mlp")
    if type(attn) is not Attention or type(mlp) is not MLP or "q_norm" in attn:
        return None
    rope = attn.rope
    if attn.sliding_window is not None or not attn.use_rope or rope.dims != attn.head_dim or rope.kind == "longrope":
        return None
    if mlp.act_name not in ("silu", "swish"):
        return None
    norms = (block.get("input_layernorm"), block.get("post_attention_layernorm"))
    if any(type(n) is not nn.RMSNorm or n.weight.dtype != mx.float32 for n in norms):
        return None
    layers = [block[part].get(name) for part, name in PROJECTIONS]
    if any(type(layer) is not KernelQuantizedLinear or "bias" in layer or not supported(layer) for layer in layers):
        return None
    arrays = [norms[0].weight, norms[1].weight, *(a for layer in layers for a in (layer["weight"], *kernel_scales(layer)))]
    return kernels.extension().block_weights(
        arrays,
        eps_in=norms[0].eps,
        eps_post=norms[1].eps,
        group_sizes=[layer.group_size for layer in layers],
        bits=[layer.bits for layer in layers],
    )


def model_plan(model: nn.Module) -> tuple | None:
    """Per block what decode_block needs (block_plan), and the attention's shapes; None unless every
    block fits and they share one RoPE (one position table a step)."""
    if not isinstance(model, DecoderLM) or not model.layers:
        return None
    plans = plan_blocks(model, block_plan)
    if plans is None:
        return None
    attn = model.layers[0].self_attn
    if any(block.self_attn.rope is not attn.rope or block.self_attn.scale != attn.scale for block in model.layers):
        return None
    return tuple(plans), (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.scale, attn.rope)


class KernelDecoder:
    """A DecoderLM's `fast_forward` on the CPU kernels (see models/transformer.FastForward): the
    plan is taken when the cache is made (`prepare`, from make_cache), so a model changed during
    one generation (weights replaced, adapters added) is seen at the next."""

    def __init__(self) -> None:
        self.plan: tuple | None = None

    def prepare(self, model: DecoderLM) -> None:
        self.plan = model_plan(model) if kernels.available() else None

    def __deepcopy__(self, memo: dict) -> "KernelDecoder":
        # a copied model (a transform's deepcopy) plans again at its first cache: the plan holds the
        # original's arrays, in the extension's BlockWeights, which cannot be copied
        return type(self)()

    def compiled_decoding_pays(self) -> bool:
        return False  # mx.compile on the CPU traces the same nodes; this path already has few

    def __call__(self, model: DecoderLM, tokens: mx.array, cache: list[KVCache]) -> mx.array | None:
        return self.forward(model, tokens, cache) if cpu_active() else None

    def forward(self, model: DecoderLM, tokens: mx.array, cache: list[KVCache]) -> mx.array | None:
        """The cached forward, each block one decode_block node: the reference forward's logits up
        to fp32 rounding (the kernels' int8 setting applies to the products as it does there).
        None for many rows, a cache other than KVCache, or activations other than fp32."""
        if self.plan is None or len(cache) != len(self.plan[0]):
            return None
        B, L = tokens.shape
        if L > MAX_POSITIONS or B * L > MAX_ROWS:
            return None
        if any(type(c) is not KVCache or (c.keys is not None and c.keys.dtype != mx.float32) for c in cache):
            return None
        h = model.embed(tokens)
        if h.dtype != mx.float32:
            return None
        plans, (n_heads, n_kv_heads, head_dim, scale, rope) = self.plan
        starts = cache[0].row_starts(B)
        inv_freq, rope_scale = rope.inv_freq(), rope.scale
        block = kernels.extension().decode_block
        template = None  # the new positions' shape, for KVCache.make_room (never evaluated)
        for weights, c in zip(plans, cache):
            write_at = c.offset
            if c.keys is None or write_at + L > c.keys.shape[2]:  # make_room makes or grows the storage
                if template is None:
                    template = mx.zeros((B, n_kv_heads, L, head_dim), mx.float32)
                c.make_room(template, template)
            else:
                c.offset += L  # make_room without growth: the positions are written by decode_block
            h, c.keys, c.values = block(
                [h, inv_freq, starts, c.keys, c.values],
                weights,
                scale=scale,
                rope_scale=rope_scale,
                n_heads=n_heads,
                n_kv_heads=n_kv_heads,
                write_at=write_at,
            )
        return model.head(h)


def install(model: Model) -> KernelDecoder | None:
    """Give a DecoderLM whose blocks run on the CPU kernels (use_cpu_kernels) the one-node-a-block
    decode path; returns the decoder, or None (and the model keeps its own forward) when the
    kernels are unavailable or no block fits it now."""
    if not isinstance(model, DecoderLM) or not kernels.available() or model_plan(model) is None:
        return None
    model.fast_forward = KernelDecoder()
    return model.fast_forward
