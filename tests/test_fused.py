"""The fused decode path (backends/cuda/fused.py's ops, backends/cuda/decoder.py's forward, which
the Engine installs into the reference model on CUDA): on CUDA each op is one kernel; here, on the
CPU, the same path runs the plain MLX implementations, so these tests pin down what the path
computes. scripts/gpu_profile.py checks the CUDA kernels against these same ops on the GPU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stratlm.backends.cuda import decoder, fused
from stratlm.core.cache import KVCache, StaticKVCache
from stratlm.core.model import Model
from stratlm.core.types import GenerationParams
from stratlm.decoding.loop import run_single
from stratlm.models.transformer import RoPE
from stratlm.testing import tiny_model

SCALINGS = {
    "default": None,
    "linear": {"type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


def close(a: mx.array, b: mx.array, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=tol, atol=tol)


def test_the_cpu_takes_the_plain_mlx_ops():
    assert fused.ops_for(mx.float32) is fused.MLX_OPS
    assert not fused.cuda_active()


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rotation_matches_fast_rope(scaling):
    rope = RoPE(32, 10000.0, SCALINGS[scaling])
    x = mx.random.normal((2, 3, 5, 32), key=mx.random.key(0))
    for offset in (0, 7, 900):
        expected = rope._rope(x, offset)
        got = fused.rotate_half_split(x, rope.inv_freq(), mx.array([offset, offset], dtype=mx.int32), rope.scale)
        close(got, expected, 1e-4)


def test_rotation_takes_a_position_per_row():
    rope = RoPE(16, 10000.0, None)
    x = mx.random.normal((2, 1, 3, 16), key=mx.random.key(1))
    got = fused.rotate_half_split(x, rope.inv_freq(), mx.array([2, 40], dtype=mx.int32))
    for row, offset in enumerate((2, 40)):
        close(got[row : row + 1], rope._rope(x[row : row + 1], offset), 1e-5)


def test_add_rms_norm_is_the_add_then_the_norm():
    x, delta = mx.random.normal((2, 3, 48), key=mx.random.key(2)), mx.random.normal((2, 3, 48), key=mx.random.key(3))
    w = mx.random.uniform(0.5, 1.5, (48,), key=mx.random.key(4))
    h, y = fused.add_rms_norm(x, delta, w, 1e-5)
    close(h, x + delta, 0)
    norm = nn.RMSNorm(48, eps=1e-5)
    norm.weight = w
    close(y, norm(x + delta), 1e-6)


def test_swiglu_is_silu_of_the_gate_times_up():
    gate_up = mx.random.normal((1, 4, 2 * 24), key=mx.random.key(5))
    close(fused.swiglu(gate_up), nn.silu(gate_up[..., :24]) * gate_up[..., 24:], 1e-6)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_attention_heads_are_what_the_attention_layer_feeds_attention(family):
    loaded = tiny_model(family, seed=3)
    attn = loaded.model.layers[0].self_attn
    x = mx.random.normal((2, 5, loaded.model.args.hidden_size), key=mx.random.key(6))
    offsets = mx.array([4, 4], dtype=mx.int32)
    B, L = 2, 5
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if "q_norm" in attn:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rope._rope(q.transpose(0, 2, 1, 3), 4), attn.rope._rope(k.transpose(0, 2, 1, 3), 4)
    qkv = mx.concatenate([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], axis=-1)
    norms = (attn.q_norm.weight, attn.k_norm.weight) if "q_norm" in attn else (None, None)
    got = fused.attention_heads(qkv, attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.rope.inv_freq(), offsets,
                                rope_scale=attn.rope.scale, q_norm=norms[0], k_norm=norms[1], eps=loaded.model.args.rms_norm_eps)
    for a, b in zip(got, (q, k, v)):
        assert a.shape == b.shape
        close(a, b, 1e-5)


# the MLX ops taking the gemv route for up to 8 rows, as the CUDA kernels do (on CUDA for
# shapes that fit them; the tiny models' do not)
GEMV_ROUTE = fused.MLX_OPS._replace(gemv_fits=lambda rows, dims, dtype, head_dim: rows <= fused.GEMV_MAX_ROWS)


def decode_both_ways(model: Model, prompts: mx.array, padding: list[int], steps: int, ops=None) -> float:
    """Largest logit difference between the ordinary forward and the installed fused forward,
    prompt then steps."""
    plain_cache = model.make_cache(padding)
    fused_cache = model.make_cache(padding)
    fast = model.fast_forward
    expected, got = Model.__call__(model, prompts, plain_cache), fast.forward(model, prompts, fused_cache, ops)
    assert got is not None
    # real positions only: a padding query sees its own key in the ordinary forward (KVCache.make_mask)
    # and nothing in the fused attention; its logits are never read, and it reaches no real position
    real = mx.arange(prompts.shape[1])[None, :] >= mx.array(padding)[:, None]
    worst = float(mx.where(real[..., None], mx.abs(expected - got), 0).max())
    tokens = mx.argmax(expected[:, -1:], axis=-1)
    for _ in range(steps):
        expected, got = Model.__call__(model, tokens, plain_cache), fast.forward(model, tokens, fused_cache, ops)
        worst = max(worst, float(mx.abs(expected - got).max()))
        tokens = mx.argmax(expected[:, -1:], axis=-1)
    return worst


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(["qwen3", "llama"]),
    scaling=st.sampled_from(list(SCALINGS)),
    rows=st.integers(1, 3),
    length=st.integers(1, 6),
    pad=st.integers(0, 3),
    tied=st.booleans(),
    gemv=st.booleans(),
    seed=st.integers(0, 50),
)
def test_fused_forward_gives_the_ordinary_forwards_logits(family, scaling, rows, length, pad, tied, gemv, seed):
    """Prompts and decode steps, rows left-padded; with the gemv route, prompts of more than 8
    rows x positions take the matmul route and one row's decode steps the gemv one."""
    loaded = tiny_model(family, seed=seed, rope_scaling=SCALINGS[scaling], tie_word_embeddings=tied)
    model = loaded.model
    decoder.install(model)
    padding = [pad if r == rows - 1 else 0 for r in range(rows)]
    prompts = mx.random.randint(0, model.vocab_size, (rows, length + pad), key=mx.random.key(seed))
    assert decode_both_ways(model, prompts, padding, steps=3, ops=GEMV_ROUTE if gemv else None) < 2e-5


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_fused_decode_over_a_static_cache_reads_it_up_to_the_position(family):
    """The compiled step's cache (StaticKVCache: fixed storage, the position an array) through the
    gemv route's attention over the storage: the ordinary forward's logits, also after a trim."""
    model = tiny_model(family, seed=3).model
    fast = decoder.install(model)
    plain, static = model.make_cache(), [StaticKVCache(8) for _ in model.layers]
    for c in static:
        c.tracing = True  # as inside the compiled step: the position an array
    prompt = mx.array([[5, 3, 8, 1]])
    close(fast.forward(model, prompt, static, GEMV_ROUTE), Model.__call__(model, prompt, plain), 2e-5)
    for step, token in enumerate((7, 2, 9, 4)):
        if step == 2:
            for c in plain + static:
                c.trim(1)
        x = mx.array([[token]])
        close(fast.forward(model, x, static, GEMV_ROUTE), Model.__call__(model, x, plain), 2e-5)


def test_norm_gemv_and_gemv_are_the_norm_and_the_products():
    x, delta = mx.random.normal((2, 1, 64), key=mx.random.key(7)), mx.random.normal((2, 1, 64), key=mx.random.key(8))
    norm_w = mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(9))
    w = mx.random.normal((96, 64), key=mx.random.key(10))
    h, out = fused.norm_gemv(x, delta, norm_w, 1e-6, w)
    close(h, x + delta, 0)
    close(out, mx.fast.rms_norm(x + delta, norm_w, 1e-6) @ w.T, 1e-5)
    h, act = fused.norm_gemv(x, None, norm_w, 1e-6, w, swiglu=True)
    assert h is x
    gate_up = mx.fast.rms_norm(x, norm_w, 1e-6) @ w.T
    close(act, nn.silu(gate_up[..., :48]) * gate_up[..., 48:], 1e-5)
    inv_freq, offsets = RoPE(16, 10000.0, None).inv_freq(), mx.array([3, 9], dtype=mx.int32)
    qk_w = mx.random.uniform(0.5, 1.5, (16,), key=mx.random.key(12))
    h, q, k, v = fused.norm_gemv_heads(x, delta, norm_w, 1e-6, w, 4, 1, 16, inv_freq, offsets, q_norm=qk_w, k_norm=qk_w)
    qkv = mx.fast.rms_norm(x + delta, norm_w, 1e-6) @ w.T
    for a, b in zip((h, q, k, v), (x + delta, *fused.attention_heads(qkv, 4, 1, 16, inv_freq, offsets, q_norm=qk_w, k_norm=qk_w))):
        close(a, b, 1e-5)
    heads = mx.random.normal((2, 4, 1, 16), key=mx.random.key(11))  # attention's (B, H, 1, D) output
    close(fused.gemv(heads, w[:, :64], (2, 1, 96)), heads.reshape(2, 1, 64) @ w[:, :64].T, 1e-5)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 3), new=st.integers(1, 4), cached=st.integers(0, 9), pad=st.integers(0, 3), shift=st.booleans(), seed=st.integers(0, 50))
def test_attention_over_the_cache_storage_is_attention_over_its_slices(rows, new, cached, pad, shift, seed):
    """attention_cached over KVCache.make_room's whole storage (the last row left-padded; after
    `filter` dropped common padding the storage is a view) equals attention over
    update_and_fetch's slices with the cache's own mask, in (B, L, H, D) layout, and the storage
    it gives back holds what update_and_fetch wrote."""
    keys = iter(mx.random.split(mx.random.key(seed), 8))
    n_heads, n_kv, dim = 4, 2, 32
    padding = [pad if r == rows - 1 else 0 for r in range(rows)]
    padding = [p + 1 for p in padding] if shift else padding  # every row padded: filter shifts the storage
    caches = [fused_cache, sliced_cache] = [KVCache(padding), KVCache(padding)]
    first = cached + max(padding) + 1
    k0, v0 = (mx.random.normal((rows, n_kv, first, dim), key=next(keys)) for _ in range(2))
    for c in caches:
        c.update_and_fetch(k0, v0)
        c.filter(list(range(rows)))
    q = mx.random.normal((rows, n_heads, new, dim), key=next(keys))
    k, v = (mx.random.normal((rows, n_kv, new, dim), key=next(keys)) for _ in range(2))
    offsets = mx.broadcast_to(mx.array(fused_cache.rope_offset), (rows,)).astype(mx.int32)
    starts = fused_cache.left_padding if fused_cache.left_padding is not None else mx.zeros((rows,), mx.int32)
    mask = sliced_cache.make_mask(new)
    expected = mx.fast.scaled_dot_product_attention(q, *sliced_cache.update_and_fetch(k, v), scale=0.3, mask=mask)
    got, fused_cache.keys, fused_cache.values = fused.attention_cached(q, k, v, *fused_cache.make_room(k, v), offsets, starts, 0.3)
    assert got.shape == (rows, new, n_heads, dim)
    close(got, expected.transpose(0, 2, 1, 3), 1e-5)
    assert fused_cache.offset == sliced_cache.offset
    for a, b in ((fused_cache.keys, sliced_cache.keys), (fused_cache.values, sliced_cache.values)):
        close(a[:, :, : fused_cache.offset], b[:, :, : sliced_cache.offset], 0)


def test_gemv_kernels_take_whole_vectors_and_few_rows():
    qwen3_0_6b = (1024, 2048, 3072)
    assert fused.gemv_fits(1, qwen3_0_6b, mx.bfloat16, 128)
    assert fused.gemv_fits(8, qwen3_0_6b, mx.bfloat16, 128)
    assert not fused.gemv_fits(9, qwen3_0_6b, mx.bfloat16, 128)  # batch decoding: MLX's matmul
    assert not fused.gemv_fits(1, (576, 576, 1536), mx.bfloat16, 64)  # SmolLM2: not whole 256-element lane vectors
    assert fused.gemv_fits(1, (640, 640, 1536), mx.float32, 64) and not fused.gemv_fits(1, (640, 640, 1536), mx.bfloat16, 64)
    assert not fused.gemv_fits(8, (4096, 4096, 4096), mx.bfloat16, 128)  # normed rows beyond 32 KB of shared memory
    assert not fused.gemv_fits(1, qwen3_0_6b, mx.bfloat16, 120)  # a head is 8 warps x whole rows


def test_fused_forward_needs_the_fused_layout_and_sees_changes_at_the_next_cache():
    loaded = tiny_model("qwen3", seed=4)
    model = loaded.model
    tokens = mx.array([[1, 2, 3]])
    model.fast_forward = fast = decoder.FusedDecoder()
    assert fast.forward(model, tokens, model.make_cache()) is None  # not optimized for inference
    model.optimize_for_inference()
    assert fast.forward(model, tokens, model.make_cache()) is not None
    attn = model.layers[1].self_attn
    attn.q_proj = nn.Linear(attn.q_proj.weight.shape[1], attn.q_proj.weight.shape[0], bias=False)  # what an adapter does
    assert fast.forward(model, tokens, model.make_cache()) is None
    close(model(tokens, model.make_cache()), Model.__call__(model, tokens, model.make_cache()), 0)


def test_prompts_and_many_rows_take_the_ordinary_graph():
    model = tiny_model("llama", seed=6).model
    fast = decoder.install(model)
    assert fast.forward(model, mx.zeros((1, 16), dtype=mx.int32), model.make_cache()) is not None
    assert fast.forward(model, mx.zeros((1, 17), dtype=mx.int32), model.make_cache()) is None
    assert fast.forward(model, mx.zeros((1025, 1), dtype=mx.int32), model.make_cache()) is None


class AnyDevice(decoder.FusedDecoder):
    """The fused decoder as installed, but taking its path on any device (plain MLX ops here, the
    gemv route for decode steps), counting the forwards it ran."""

    ran = 0

    def __call__(self, model, tokens, cache):
        logits = self.forward(model, tokens, cache, GEMV_ROUTE)
        self.ran += logits is not None
        return logits


def test_the_reference_model_decodes_through_the_installed_forward():
    """The seam: an installed fast forward plans at make_cache and answers the model's cached
    calls; where it answers None (a 20-token prompt), the reference forward runs. Off CUDA the
    real decoder stands aside (the compiled step does not pay either)."""
    reference, fast = tiny_model("qwen3", seed=8), tiny_model("qwen3", seed=8)
    tokens = mx.array([[4, 2, 7]])
    installed = decoder.install(fast.model)
    assert installed is fast.model.fast_forward and not fast.model.compiled_decoding_pays()
    close(fast.model(tokens, fast.model.make_cache()), Model.__call__(fast.model, tokens, fast.model.make_cache()), 0)
    fast.model.fast_forward = AnyDevice()
    params = GenerationParams(max_tokens=6, ignore_eos=True, logprobs=True)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 2
    want = list(run_single(reference.model, reference.tokenizer, reference.eos_token_ids, prompt, params))[-1]
    got = list(run_single(fast.model, fast.tokenizer, fast.eos_token_ids, prompt, params))[-1]
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    assert fast.model.fast_forward.ran >= 6  # the prompt's last position and every decode step


def test_the_engine_keeps_the_cpu_layout():
    from stratlm import Engine

    loaded = tiny_model("llama", seed=5)
    Engine(loaded, "greedy")
    # on CUDA the Engine installs the fused decode path (backends/cuda/decoder.install)
    assert "_fused" not in loaded.model.layers[0].self_attn and loaded.model.fast_forward is None
