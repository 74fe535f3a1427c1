"""Fused transformer ops for decoding on CUDA: fewer graph nodes per token.

On a GPU a small model's decode step is bound by per-node host work (building the graph in
Python, then encoding each node), not by the device: each op removed from a layer saves a few
microseconds, ~30 layers a token. These ops each do in one CUDA kernel (mx.fast.cuda_kernel,
compiled at first use and cached by MLX) what takes several MLX ops:

- `add_rms_norm`: the residual add and the next RMSNorm (two outputs);
- `attention_heads`: the fused q/k/v projection's output split into heads, q/k RMSNorm
  (Qwen3), RoPE (Hugging Face half-split layout) and the (B, heads, L, dim) layout attention takes;
- `swiglu`: silu(gate) * up on the fused gate/up projection's output;
- for a few rows (decoding, up to GEMV_MAX_ROWS): `norm_gemv`, the residual add, the norm and the
  projection (and SwiGLU after the gate/up one) in one kernel; `norm_gemv_heads`, the same for
  the q/k/v projection with attention_heads after it; and `gemv`, a plain projection reading
  attention's (B, H, 1, D) output as it is. These accumulate in fp32 where MLX's fp32 matmul on
  an H100 rounds its inputs to TF32 (~1e-3 apart).

Elsewhere (CPU, Metal) each runs as the plain MLX ops it replaces, with the same rounding
steps; that is also the oracle the CUDA kernels are tested against.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Callable, NamedTuple

import mlx.core as mx

from stratlm.device import cuda_active  # where the kernels below apply; tests replace it here


_CUDA_TYPES = frozenset({mx.float32, mx.float16, mx.bfloat16})  # what the kernels are instantiated for

# Device functions every kernel below shares (each rounding step written once).
_DEVICE = """
// a block's sum, broadcast to every thread (blockDim.x a multiple of 32)
__device__ inline float stratlm_block_sum(float v, float* partial) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// one RMS-normed value rounded as mx.fast.rms_norm rounds it: T(w * T(x * inv_rms))
template <typename T>
__device__ inline float stratlm_normed(float x, float inv_rms, T w) {
  return static_cast<float>(static_cast<T>(static_cast<float>(w) * static_cast<float>(static_cast<T>(x * inv_rms))));
}

// silu(gate) * up rounded as nn.silu(gate) * up: the sigmoid, the activation, the product
template <typename T>
__device__ inline T stratlm_swiglu(float gate, float up) {
  const T sig = static_cast<T>(1.f / (1.f + expf(-gate)));
  const T act = static_cast<T>(gate * static_cast<float>(sig));
  return static_cast<T>(static_cast<float>(act) * up);
}

// the pair (i, i + D/2) of a q or k head: RMS-normed with norm_w when NORM, then rotated by
// RoPE (Hugging Face half-split layout) at angle (scale * position) * inv_freq_i, into out
template <bool NORM, typename T>
__device__ inline void stratlm_norm_rope(float x1, float x2, float inv_rms, const T* norm_w, int i, int half,
                                         float scale, int position, float inv_freq_i, T* out) {
  if (NORM) {
    x1 = stratlm_normed(x1, inv_rms, norm_w[i]);
    x2 = stratlm_normed(x2, inv_rms, norm_w[i + half]);
  }
  const float theta = (scale * static_cast<float>(position)) * inv_freq_i;
  const float c = cos(theta), s = sin(theta);
  out[i] = static_cast<T>(x1 * c - x2 * s);
  out[i + half] = static_cast<T>(x1 * s + x2 * c);
}
"""


def _cuda_kernel(name: str, inputs: list[str], outputs: list[str], source: str, header: str = "", contiguous: bool = True):
    """mx.fast.cuda_kernel, named after a hash of its code: MLX keys its compiled kernels (and its
    on-disk PTX cache) by name, so constants baked into the source (eps, scales) or a changed
    kernel must not share one. `contiguous=False`: inputs are passed as they lie (the kernel
    indexes them by their strides) instead of copied row-contiguous first."""
    digest = hashlib.sha1((header + source + ",".join(inputs) + ";" + ",".join(outputs) + str(contiguous)).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"{name}_{digest}", input_names=inputs, output_names=outputs, source=source, header=header,
                               ensure_row_contiguous=contiguous)


def _float_literal(x: float) -> str:
    return f"{float(x)!r}f"


# -- residual add + RMSNorm ----------------------------------------------------------------------
@lru_cache(maxsize=None)
def _add_rms_norm_kernel(eps: float):
    # mx.fast.rms_norm's rounding: y = w * T(h * rsqrt(mean(h^2) + eps)), sums in fp32
    source = f"""
  __shared__ float partial[32];
  const size_t base = (size_t)blockIdx.x * D;
  float squares = 0.f;
  for (int j = threadIdx.x; j < D; j += blockDim.x) {{
    T hj = static_cast<T>(static_cast<float>(x[base + j]) + static_cast<float>(delta[base + j]));
    h[base + j] = hj;
    float f = static_cast<float>(hj);
    squares += f * f;
  }}
  const float n = rsqrtf(stratlm_block_sum(squares, partial) / D + {_float_literal(eps)});
  for (int j = threadIdx.x; j < D; j += blockDim.x) y[base + j] = static_cast<T>(stratlm_normed(static_cast<float>(h[base + j]), n, w[j]));
"""
    return _cuda_kernel("stratlm_add_rms_norm", ["x", "delta", "w"], ["h", "y"], source, _DEVICE)


@lru_cache(maxsize=256)
def _add_rms_norm_launch(shape: tuple[int, ...], dtype: mx.Dtype) -> dict:
    rows = math.prod(shape[:-1])
    return dict(template=[("T", dtype), ("D", shape[-1])], grid=(rows * 256, 1, 1), threadgroup=(256, 1, 1),
                output_shapes=[shape, shape], output_dtypes=[dtype, dtype])


def add_rms_norm(x: mx.array, delta: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """h = x + delta and rms_norm(h) * weight over the last axis: (h, normed)."""
    return ops_for(x.dtype).add_rms_norm(x, delta, weight, eps)


def _add_rms_norm_cuda(x, delta, weight, eps):
    return _add_rms_norm_kernel(eps)(inputs=[x, delta, weight], **_add_rms_norm_launch(x.shape, x.dtype))


def _add_rms_norm_mlx(x, delta, weight, eps):
    h = x + delta
    return h, mx.fast.rms_norm(h, weight, eps)


# -- q/k/v heads: split, q/k norm, RoPE ----------------------------------------------------------
@lru_cache(maxsize=None)
def _attention_heads_kernel(eps: float, rope_scale: float):
    # one block per (head, row), one thread per rotated pair (i, i + D/2); q/k norm then RoPE,
    # rounded to T after each as the unfused ops do (rms_norm, then fast.rope)
    source = f"""
  __shared__ float partial[32];
  constexpr int HALF = D / 2;
  const int head = blockIdx.x, row = blockIdx.y, i = threadIdx.x;
  const int L = qkv_shape[1];
  const int b = row / L, l = row - b * L;
  const T* src = qkv + ((size_t)row * (HQ + 2 * HK) + head) * D;
  if (head >= HQ + HK) {{
    T* dst = v + (((size_t)b * HK + (head - HQ - HK)) * L + l) * D;
    dst[i] = src[i];
    dst[i + HALF] = src[i + HALF];
    return;
  }}
  const float x1 = static_cast<float>(src[i]), x2 = static_cast<float>(src[i + HALF]);
  const bool is_q = head < HQ;
  T* dst = is_q ? q + (((size_t)b * HQ + head) * L + l) * D : k + (((size_t)b * HK + (head - HQ)) * L + l) * D;
  float n = 1.f;
  if constexpr (NORM) n = rsqrtf(stratlm_block_sum(x1 * x1 + x2 * x2, partial) / D + {_float_literal(eps)});
  stratlm_norm_rope<NORM>(x1, x2, n, is_q ? q_norm : k_norm, i, HALF, {_float_literal(rope_scale)}, offsets[b] + l, inv_freq[i], dst);
"""
    return _cuda_kernel("stratlm_attention_heads", ["qkv", "q_norm", "k_norm", "inv_freq", "offsets"], ["q", "k", "v"], source, _DEVICE)


@lru_cache(maxsize=256)
def _attention_heads_launch(B: int, L: int, n_heads: int, n_kv_heads: int, head_dim: int, norm: bool, dtype: mx.Dtype) -> dict:
    return dict(
        template=[("T", dtype), ("HQ", n_heads), ("HK", n_kv_heads), ("D", head_dim), ("NORM", norm)],
        grid=(head_dim // 2 * (n_heads + 2 * n_kv_heads), B * L, 1), threadgroup=(head_dim // 2, 1, 1),
        output_shapes=[(B, n_heads, L, head_dim), (B, n_kv_heads, L, head_dim), (B, n_kv_heads, L, head_dim)],
        output_dtypes=[dtype] * 3)


def attention_heads(
    qkv: mx.array,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    inv_freq: mx.array,
    offsets: mx.array,
    *,
    rope_scale: float = 1.0,
    q_norm: mx.array | None = None,
    k_norm: mx.array | None = None,
    eps: float = 1e-6,
) -> tuple[mx.array, mx.array, mx.array]:
    """qkv (B, L, (n_heads + 2 n_kv_heads) * head_dim), the q, k, v projections side by side ->
    q (B, n_heads, L, head_dim), k and v (B, n_kv_heads, L, head_dim): q and k RMS-normed per
    head when q_norm/k_norm are given, then rotated (non-interleaved RoPE) at positions
    offsets[b] + l, angle (rope_scale * position) * inv_freq (float32, head_dim / 2)."""
    return ops_for(qkv.dtype).attention_heads(qkv, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, eps)


def _attention_heads_cuda(qkv, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, eps):
    if head_dim % 64:  # the kernel's blocks are head_dim / 2 threads, whole warps
        return _attention_heads_mlx(qkv, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, eps)
    B, L, _ = qkv.shape
    norm = q_norm is not None
    dummy = qkv  # stands in for the norm weights (unused, but typed T) without q/k norm
    return _attention_heads_kernel(eps, rope_scale)(
        inputs=[qkv, q_norm if norm else dummy, k_norm if norm else dummy, inv_freq, offsets],
        **_attention_heads_launch(B, L, n_heads, n_kv_heads, head_dim, norm, qkv.dtype))


def _attention_heads_mlx(qkv, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, eps):
    B, L, _ = qkv.shape
    q, k, v = mx.split(qkv, [n_heads * head_dim, (n_heads + n_kv_heads) * head_dim], axis=-1)
    q = q.reshape(B, L, n_heads, head_dim)
    k = k.reshape(B, L, n_kv_heads, head_dim)
    v = v.reshape(B, L, n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    if q_norm is not None:
        q, k = mx.fast.rms_norm(q, q_norm, eps), mx.fast.rms_norm(k, k_norm, eps)
    q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    return rotate_half_split(q, inv_freq, offsets, rope_scale), rotate_half_split(k, inv_freq, offsets, rope_scale), v


def rotate_half_split(x: mx.array, inv_freq: mx.array, offsets: mx.array, rope_scale: float = 1.0) -> mx.array:
    """RoPE in the Hugging Face layout (pairs i, i + dim/2) of x (B, H, L, dim), in fp32, the
    result rounded to x's dtype (what fast.rope computes)."""
    L, half = x.shape[2], x.shape[3] // 2
    positions = (offsets[:, None] + mx.arange(L, dtype=mx.int32)[None, :]).astype(mx.float32) * rope_scale  # (B, L)
    theta = positions[:, None, :, None] * inv_freq  # (B, 1, L, half)
    cos, sin = mx.cos(theta), mx.sin(theta)
    x1, x2 = x[..., :half].astype(mx.float32), x[..., half:].astype(mx.float32)
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


# -- SwiGLU --------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _swiglu_kernel():
    source = """
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t rows = (size_t)gate_up_shape[0] * gate_up_shape[1];
  if (idx >= rows * I) return;
  const size_t r = idx / I, j = idx - r * I;
  out[idx] = stratlm_swiglu<T>(static_cast<float>(gate_up[r * 2 * I + j]), static_cast<float>(gate_up[r * 2 * I + I + j]));
"""
    return _cuda_kernel("stratlm_swiglu", ["gate_up"], ["out"], source, _DEVICE)


@lru_cache(maxsize=256)
def _swiglu_launch(B: int, L: int, inter: int, dtype: mx.Dtype) -> dict:
    return dict(template=[("T", dtype), ("I", inter)], grid=(math.ceil(B * L * inter / 256) * 256, 1, 1),
                threadgroup=(256, 1, 1), output_shapes=[(B, L, inter)], output_dtypes=[dtype])


def swiglu(gate_up: mx.array) -> mx.array:
    """gate_up (B, L, 2I), gate then up -> silu(gate) * up (B, L, I), rounded as nn.silu(gate) * up."""
    return ops_for(gate_up.dtype).swiglu(gate_up)


def _swiglu_cuda(gate_up):
    B, L, two_i = gate_up.shape
    return _swiglu_kernel()(inputs=[gate_up], **_swiglu_launch(B, L, two_i // 2, gate_up.dtype))[0]


def _swiglu_mlx(gate_up):
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    return (gate * mx.sigmoid(gate)) * up


# -- matrix-vector products for a few rows, with the norm before and SwiGLU after ------------
GEMV_MAX_ROWS = 8  # rows (batch x positions) the gemv kernels take; more go to MLX's matmul
_GEMV_WARPS = 8  # output rows a block computes, one per warp


def _norm_prologue(add: bool, eps: float) -> str:
    """The M rows x (+ delta, written to h by block 0), RMS-normed and rounded as the unfused ops
    do, staged as floats in shared memory (ys) for the block's products."""
    return f"""
  __shared__ __align__(16) float ys[M * K];
  __shared__ float partial[32];
  for (int m = 0; m < M; ++m) {{
    float squares = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {{
      {"T hk = static_cast<T>(static_cast<float>(x[m * K + k]) + static_cast<float>(delta[m * K + k]));" if add else "T hk = x[m * K + k];"}
      {"if (blockIdx.x == 0) h[m * K + k] = hk;" if add else ""}
      const float f = static_cast<float>(hk);
      ys[m * K + k] = f;
      squares += f * f;
    }}
    const float n = rsqrtf(stratlm_block_sum(squares, partial) / K + {_float_literal(eps)});
    for (int k = threadIdx.x; k < K; k += blockDim.x) {{
      ys[m * K + k] = stratlm_normed(ys[m * K + k], n, norm_w[k]);
    }}
    __syncthreads();
  }}
"""


_LOAD_NORMED_X = """const float4* xv = reinterpret_cast<const float4*>(&ys[m * K + k0]);
        float xs[VEC];
        for (int v = 0; v < VEC / 4; ++v) { float4 f4 = xv[v]; xs[4 * v] = f4.x; xs[4 * v + 1] = f4.y; xs[4 * v + 2] = f4.z; xs[4 * v + 3] = f4.w; }"""


def _gemv_source(norm: bool, add: bool, swiglu: bool, eps: float) -> str:
    """x (M, K) [+ delta] [-> RMSNorm] @ w (N, K)^T -> out (M, N), or with SwiGLU, w holding the gate
    rows then the up rows, out (M, N / 2) = silu(gate) * up. Rounded to T where the unfused ops
    round: the sum, the norm, each product (fp32 accumulation), the activation."""
    if norm:
        prologue = _norm_prologue(add, eps)
        load_x = _LOAD_NORMED_X
    else:
        prologue = ""
        load_x = """const uint4 xraw = *reinterpret_cast<const uint4*>(x + m * K + k0);
        const T* xt = reinterpret_cast<const T*>(&xraw);
        float xs[VEC];
        for (int v = 0; v < VEC; ++v) xs[v] = static_cast<float>(xt[v]);"""
    rows_out = "N / 2" if swiglu else "N"
    up = """
      const uint4 uraw = *reinterpret_cast<const uint4*>(w + (size_t)(j + N / 2) * K + k0);
      const T* uw = reinterpret_cast<const T*>(&uraw);""" if swiglu else ""
    up_acc = "for (int v = 0; v < VEC; ++v) acc_up[m] += static_cast<float>(uw[v]) * xs[v];" if swiglu else ""
    store = """
      out[m * ROWS_OUT + j] = stratlm_swiglu<T>(static_cast<float>(static_cast<T>(acc[m])), static_cast<float>(static_cast<T>(acc_up[m])));""" if swiglu else """
      out[m * ROWS_OUT + j] = static_cast<T>(acc[m]);"""
    return f"""
  constexpr int VEC = 16 / sizeof(T);
  constexpr int ROWS_OUT = {rows_out};
{prologue}
  const int lane = threadIdx.x % 32;
  const int j = blockIdx.x * {_GEMV_WARPS} + threadIdx.x / 32;
  if (j >= ROWS_OUT) return;
  float acc[M], acc_up[M];
  for (int m = 0; m < M; ++m) {{ acc[m] = 0.f; acc_up[m] = 0.f; }}
  for (int k0 = lane * VEC; k0 < K; k0 += 32 * VEC) {{
    const uint4 wraw = *reinterpret_cast<const uint4*>(w + (size_t)j * K + k0);
    const T* wt = reinterpret_cast<const T*>(&wraw);{up}
    for (int m = 0; m < M; ++m) {{
        {load_x}
      for (int v = 0; v < VEC; ++v) acc[m] += static_cast<float>(wt[v]) * xs[v];
      {up_acc}
    }}
  }}
  for (int m = 0; m < M; ++m) {{
    for (int o = 16; o > 0; o >>= 1) {{
      acc[m] += __shfl_xor_sync(0xffffffff, acc[m], o);
      acc_up[m] += __shfl_xor_sync(0xffffffff, acc_up[m], o);
    }}
  }}
  if (lane == 0) {{
    for (int m = 0; m < M; ++m) {{{store}
    }}
  }}
"""


@lru_cache(maxsize=None)
def _gemv_kernel(norm: bool, add: bool, swiglu: bool, eps: float):
    inputs = ["x"] + (["delta"] if add else []) + (["norm_w"] if norm else []) + ["w"]
    outputs = (["h"] if add else []) + ["out"]
    name = "stratlm_gemv" + ("_norm" if norm else "") + ("_add" if add else "") + ("_swiglu" if swiglu else "")
    return _cuda_kernel(name, inputs, outputs, _gemv_source(norm, add, swiglu, eps), _DEVICE)


def _gemv_heads_source(add: bool, eps: float, qk_eps: float, rope_scale: float) -> str:
    """norm_gemv for the q/k/v projection with attention_heads after it: one block per head
    computes the head's D outputs for all M rows (each warp D / 8 of them), then q/k norm, RoPE
    and the (B, heads, LEN, D) layout, as attention_heads does."""
    return f"""
  constexpr int VEC = 16 / sizeof(T);
  constexpr int HALF = D / 2;
  constexpr int ROWS_PER_WARP = D / {_GEMV_WARPS};
{_norm_prologue(add, eps)}
  __shared__ float res[M * D];
  __shared__ float inv_rms[M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, head = blockIdx.x;
  #pragma unroll 4
  for (int r = 0; r < ROWS_PER_WARP; ++r) {{  // unrolled: several rows' loads in flight
    const int row = warp * ROWS_PER_WARP + r;
    const T* wrow = w + ((size_t)head * D + row) * K;
    float acc[M];
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    for (int k0 = lane * VEC; k0 < K; k0 += 32 * VEC) {{
      const uint4 wraw = *reinterpret_cast<const uint4*>(wrow + k0);
      const T* wt = reinterpret_cast<const T*>(&wraw);
      for (int m = 0; m < M; ++m) {{
        {_LOAD_NORMED_X}
        for (int v = 0; v < VEC; ++v) acc[m] += static_cast<float>(wt[v]) * xs[v];
      }}
    }}
    for (int m = 0; m < M; ++m) {{
      for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffff, acc[m], o);
      if (lane == 0) res[m * D + row] = static_cast<float>(static_cast<T>(acc[m]));  // a matmul's output, rounded to T
    }}
  }}
  __syncthreads();
  if (head >= HQ + HK) {{
    for (int t = threadIdx.x; t < M * D; t += blockDim.x) {{
      const int m = t / D, i = t - m * D, b = m / LEN, l = m - b * LEN;
      v[(((size_t)b * HK + (head - HQ - HK)) * LEN + l) * D + i] = static_cast<T>(res[t]);
    }}
    return;
  }}
  const bool is_q = head < HQ;
  if (NORM) {{
    if (warp < M) {{
      float squares = 0.f;
      for (int i = lane; i < D; i += 32) squares += res[warp * D + i] * res[warp * D + i];
      for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffff, squares, o);
      if (lane == 0) inv_rms[warp] = rsqrtf(squares / D + {_float_literal(qk_eps)});
    }}
    __syncthreads();
  }}
  T* dst = is_q ? q : k;
  const int heads = is_q ? HQ : HK, hh = is_q ? head : head - HQ;
  for (int t = threadIdx.x; t < M * HALF; t += blockDim.x) {{
    const int m = t / HALF, i = t - m * HALF, b = m / LEN, l = m - b * LEN;
    stratlm_norm_rope<NORM>(res[m * D + i], res[m * D + i + HALF], NORM ? inv_rms[m] : 1.f, is_q ? q_norm : k_norm, i, HALF,
                            {_float_literal(rope_scale)}, offsets[b] + l, inv_freq[i], dst + (((size_t)b * heads + hh) * LEN + l) * D);
  }}
"""


@lru_cache(maxsize=None)
def _gemv_heads_kernel(add: bool, eps: float, qk_eps: float, rope_scale: float):
    inputs = ["x"] + (["delta"] if add else []) + ["norm_w", "w", "q_norm", "k_norm", "inv_freq", "offsets"]
    outputs = (["h"] if add else []) + ["q", "k", "v"]
    return _cuda_kernel("stratlm_gemv_heads" + ("_add" if add else ""), inputs, outputs, _gemv_heads_source(add, eps, qk_eps, rope_scale), _DEVICE)


@lru_cache(maxsize=256)
def _gemv_heads_launch(B: int, L: int, k: int, n_heads: int, n_kv_heads: int, head_dim: int, norm: bool, dtype: mx.Dtype, h_shape: tuple | None) -> dict:
    heads = [(B, n_heads, L, head_dim), (B, n_kv_heads, L, head_dim), (B, n_kv_heads, L, head_dim)]
    return dict(template=[("T", dtype), ("M", B * L), ("K", k), ("HQ", n_heads), ("HK", n_kv_heads), ("D", head_dim), ("LEN", L), ("NORM", norm)],
                grid=((n_heads + 2 * n_kv_heads) * 32 * _GEMV_WARPS, 1, 1), threadgroup=(32 * _GEMV_WARPS, 1, 1),
                output_shapes=([h_shape] if h_shape else []) + heads, output_dtypes=[dtype] * (4 if h_shape else 3))


def _norm_gemv_heads_cuda(x, delta, norm_w, eps, w, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, qk_eps):
    B, L, k = x.shape
    add, norm = delta is not None, q_norm is not None
    inputs = [x] + ([delta] if add else []) + [norm_w, w, q_norm if norm else x, k_norm if norm else x, inv_freq, offsets]
    outs = _gemv_heads_kernel(add, eps, qk_eps, rope_scale)(
        inputs=inputs, **_gemv_heads_launch(B, L, k, n_heads, n_kv_heads, head_dim, norm, x.dtype, x.shape if add else None))
    return tuple(outs) if add else (x, *outs)


def _norm_gemv_heads_mlx(x, delta, norm_w, eps, w, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, qk_eps):
    h, qkv = _norm_gemv_mlx(x, delta, norm_w, eps, w, False)
    return (h, *_attention_heads_mlx(qkv, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, qk_eps))


def norm_gemv_heads(x, delta, norm_w, eps, w, n_heads, n_kv_heads, head_dim, inv_freq, offsets, *, rope_scale=1.0, q_norm=None, k_norm=None, qk_eps=1e-6):
    """norm_gemv then attention_heads, for up to GEMV_MAX_ROWS rows: x (B, L, K) [+ delta] ->
    (h, q, k, v) with q, k, v as attention_heads gives them. On CUDA one kernel."""
    return ops_for(x.dtype).norm_gemv_heads(x, delta, norm_w, eps, w, n_heads, n_kv_heads, head_dim, inv_freq, offsets, rope_scale, q_norm, k_norm, qk_eps)


def gemv_fits(rows: int, dims: tuple[int, ...], dtype: mx.Dtype, head_dim: int) -> bool:
    """Whether the gemv kernels take `rows` rows of these inner dimensions (the normed input's
    first): whole 16-byte vectors per lane, the normed rows within 32 KB of shared memory, and a
    head of at most 256 a whole number of rows per warp."""
    if dtype not in _CUDA_TYPES or not 1 <= rows <= GEMV_MAX_ROWS:
        return False
    vec = 16 // dtype.size
    fits_heads = head_dim % (2 * _GEMV_WARPS) == 0 and head_dim <= 256
    return fits_heads and all(k % (32 * vec) == 0 for k in dims) and rows * dims[0] * 4 <= 32 * 1024


@lru_cache(maxsize=256)
def _gemv_launch(m: int, k: int, n: int, swiglu: bool, dtype: mx.Dtype, h_shape: tuple[int, ...] | None, out_shape: tuple[int, ...]) -> dict:
    rows_out = n // 2 if swiglu else n
    blocks = -(-rows_out // _GEMV_WARPS)
    return dict(template=[("T", dtype), ("M", m), ("K", k), ("N", n)], grid=(blocks * 32 * _GEMV_WARPS, 1, 1),
                threadgroup=(32 * _GEMV_WARPS, 1, 1), output_shapes=([h_shape] if h_shape else []) + [out_shape],
                output_dtypes=[dtype] * (2 if h_shape else 1))


def _norm_gemv_cuda(x, delta, norm_w, eps, w, swiglu):
    *lead, k = x.shape
    m, n = math.prod(lead), w.shape[0]
    add = delta is not None
    out_shape = (*lead, n // 2 if swiglu else n)
    inputs = [x, delta, norm_w, w] if add else [x, norm_w, w]
    outs = _gemv_kernel(True, add, swiglu, eps)(inputs=inputs, **_gemv_launch(m, k, n, swiglu, x.dtype, x.shape if add else None, out_shape))
    return (outs[0], outs[1]) if add else (x, outs[0])


def _norm_gemv_mlx(x, delta, norm_w, eps, w, swiglu):
    h = x if delta is None else x + delta
    out = mx.fast.rms_norm(h, norm_w, eps) @ w.T
    return h, (_swiglu_mlx(out) if swiglu else out)


def _gemv_cuda(x, w, out_shape):
    k, n = w.shape[1], w.shape[0]
    m = x.size // k
    return _gemv_kernel(False, False, False, 0.0)(inputs=[x, w], **_gemv_launch(m, k, n, False, x.dtype, None, out_shape))[0]


def _gemv_mlx(x, w, out_shape):
    return (x.reshape(-1, w.shape[1]) @ w.T).reshape(out_shape)


def norm_gemv(x: mx.array, delta: mx.array | None, norm_w: mx.array, eps: float, w: mx.array, *, swiglu: bool = False) -> tuple[mx.array, mx.array]:
    """h = x + delta (x when delta is None); returns (h, rms_norm(h) * norm_w @ w.T), the product
    through SwiGLU when `swiglu` (w's first half of rows the gate, second the up projection).
    w is (N, K) row-major: a Linear's weight. On CUDA one kernel for up to GEMV_MAX_ROWS rows."""
    return ops_for(x.dtype).norm_gemv(x, delta, norm_w, eps, w, swiglu)


def gemv(x: mx.array, w: mx.array, out_shape: tuple[int, ...]) -> mx.array:
    """x's rows of w.shape[1] values (any contiguous layout) @ w.T, shaped out_shape."""
    return ops_for(x.dtype).gemv(x, w, out_shape)


# -- attention of a few query positions over the cache's storage -----------------------------
_ATTENTION_WARPS = 16  # keys are spread over the warps of one block per (row, query head, position)
_ATTENTION_CHUNK = 4  # consecutive keys a warp loads before reducing: several loads in flight


@lru_cache(maxsize=None)
def _attention_cached_kernel(scale: float):
    # One block per (query head, position, row). The block of each KV head's first query head at
    # position 0 writes the new keys/values into the cache's storage, in place (MLX passes inputs
    # as const; the storage belongs to the cache alone and every later reader depends on this
    # step's output); every block reads the past from the storage and the new positions from k
    # and v, so no block reads what another writes. Each warp runs an online softmax over its
    # chunks of keys (each lane D / 32 of the head's values), then the warps' partial sums are
    # merged; scores and sums in fp32, as MLX's attention computes them, the output rounded once.
    source = f"""
  constexpr int E = D / 32, W = {_ATTENTION_WARPS}, C = {_ATTENTION_CHUNK}, G = HQ / HK;
  __shared__ float warp_max[W], warp_sum[W];
  __shared__ float warp_acc[W * D];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int hq = blockIdx.x, l = blockIdx.y, b = blockIdx.z, h = hq / G, LEN = q_shape[2];
  // storage positions [start, past) hold the row's past (start: its left padding); the new
  // positions follow, causal: query l sees up to past + l
  const int start = starts[b * starts_strides[0]], past = start + offsets[b * offsets_strides[0]], end = past + l + 1;
  const T* k_new = k + b * k_strides[0] + h * k_strides[1];
  const T* v_new = v + b * v_strides[0] + h * v_strides[1];
  const T* k_old = keys + b * keys_strides[0] + h * keys_strides[1];
  const T* v_old = values + b * values_strides[0] + h * values_strides[1];
  if (hq % G == 0 && l == 0) {{
    for (int t = threadIdx.x; t < LEN * D; t += blockDim.x) {{
      const int i = t / D, d = t - i * D;
      const_cast<T*>(k_old)[(past + i) * keys_strides[2] + d * keys_strides[3]] = k_new[i * k_strides[2] + d * k_strides[3]];
      const_cast<T*>(v_old)[(past + i) * values_strides[2] + d * values_strides[3]] = v_new[i * v_strides[2] + d * v_strides[3]];
    }}
  }}
  const T* qrow = q + b * q_strides[0] + hq * q_strides[1] + l * q_strides[2];
  float qs[E], acc[E];
  for (int e = 0; e < E; ++e) {{ qs[e] = {_float_literal(scale)} * static_cast<float>(qrow[(lane * E + e) * q_strides[3]]); acc[e] = 0.f; }}
  float m = -INFINITY, sum = 0.f;
  for (int j0 = start + warp * C; j0 < end; j0 += W * C) {{
    float s[C], vs[C][E];
    for (int c = 0; c < C; ++c) {{
      const int j = j0 + c;
      s[c] = 0.f;
      if (j < end) {{
        const bool old = j < past;
        const T* kr = old ? k_old + j * keys_strides[2] : k_new + (j - past) * k_strides[2];
        const T* vr = old ? v_old + j * values_strides[2] : v_new + (j - past) * v_strides[2];
        const int64_t kd = old ? keys_strides[3] : k_strides[3], vd = old ? values_strides[3] : v_strides[3];
        for (int e = 0; e < E; ++e) {{
          s[c] += qs[e] * static_cast<float>(kr[(lane * E + e) * kd]);
          vs[c][e] = static_cast<float>(vr[(lane * E + e) * vd]);
        }}
      }}
    }}
    for (int o = 16; o > 0; o >>= 1)
      for (int c = 0; c < C; ++c) s[c] += __shfl_xor_sync(0xffffffff, s[c], o);
    float chunk_max = s[0];  // key j0 is always in range
    for (int c = 1; c < C; ++c) if (j0 + c < end) chunk_max = fmaxf(chunk_max, s[c]);
    const float m_new = fmaxf(m, chunk_max), correction = expf(m - m_new);
    sum *= correction;
    for (int e = 0; e < E; ++e) acc[e] *= correction;
    for (int c = 0; c < C; ++c) {{
      if (j0 + c < end) {{
        const float p = expf(s[c] - m_new);
        sum += p;
        for (int e = 0; e < E; ++e) acc[e] += p * vs[c][e];
      }}
    }}
    m = m_new;
  }}
  if (lane == 0) {{ warp_max[warp] = m; warp_sum[warp] = sum; }}
  for (int e = 0; e < E; ++e) warp_acc[warp * D + lane * E + e] = acc[e];
  __syncthreads();
  for (int t = threadIdx.x; t < D; t += blockDim.x) {{
    float top = -INFINITY;
    for (int w = 0; w < W; ++w) top = fmaxf(top, warp_max[w]);
    float num = 0.f, den = 0.f;
    for (int w = 0; w < W; ++w) {{
      if (warp_max[w] == -INFINITY) continue;  // a warp that had no keys
      const float f = expf(warp_max[w] - top);
      num += f * warp_acc[w * D + t];
      den += f * warp_sum[w];
    }}
    out[(((size_t)b * LEN + l) * HQ + hq) * D + t] = static_cast<T>(num / den);
  }}
"""
    # every input as it lies, by its strides: the storage must not be copied (it is written)
    return _cuda_kernel("stratlm_attention_cached", ["q", "k", "v", "keys", "values", "offsets", "starts"], ["out"], source, contiguous=False)


@lru_cache(maxsize=256)
def _attention_cached_launch(B: int, L: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype: mx.Dtype) -> dict:
    # the number of positions is read from q's shape, not a template constant: one kernel for all
    return dict(template=[("T", dtype), ("HQ", n_heads), ("HK", n_kv_heads), ("D", head_dim)],
                grid=(n_heads * 32 * _ATTENTION_WARPS, L, B), threadgroup=(32 * _ATTENTION_WARPS, 1, 1),
                output_shapes=[(B, L, n_heads, head_dim)], output_dtypes=[dtype])


def attention_cached(q, k, v, keys, values, offsets, starts, scale) -> tuple[mx.array, mx.array, mx.array]:
    """Attention of L new positions over a cache: q (B, n_heads, L, D) and the new k, v
    (B, n_kv_heads, L, D); keys, values the cache's whole storage (B, n_kv_heads, capacity, D) as
    KVCache.make_room gives it, the new positions not yet written. Row b's query l sees storage
    positions starts[b] (its left padding) to starts[b] + offsets[b] + l, offsets being the rows'
    RoPE offsets before the new positions. Returns (out, keys, values): out (B, L, n_heads, D),
    B * L rows of n_heads * D for the output projection as they lie, and the storage with the new
    positions written. On CUDA one kernel that writes them into the storage in place (the same
    arrays come back: no slice or copy of the cache); elsewhere MLX ops and new storage arrays."""
    return ops_for(q.dtype).attention_cached(q, k, v, keys, values, offsets, starts, scale)


def _attention_cached_cuda(q, k, v, keys, values, offsets, starts, scale):
    B, n_heads, L, head_dim = q.shape
    if head_dim % 32 or not q.dtype == k.dtype == keys.dtype:
        return _attention_cached_mlx(q, k, v, keys, values, offsets, starts, scale)
    launch = _attention_cached_launch(B, L, n_heads, keys.shape[1], head_dim, q.dtype)
    return _attention_cached_kernel(scale)(inputs=[q, k, v, keys, values, offsets, starts], **launch)[0], keys, values


def _attention_cached_mlx(q, k, v, keys, values, offsets, starts, scale):
    L = q.shape[2]
    at = (starts[:1] + offsets[:1]).astype(mx.int32)  # the rows' new positions share storage columns
    keys, values = mx.slice_update(keys, k, at, axes=(2,)), mx.slice_update(values, v, at, axes=(2,))
    position = mx.arange(keys.shape[2], dtype=mx.int32)  # (capacity,)
    start = starts[:, None, None, None]
    end = (starts + offsets)[:, None, None, None] + mx.arange(1, L + 1, dtype=mx.int32)[None, None, :, None]
    mask = (position >= start) & (position < end)  # (B, 1, L, capacity)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask).transpose(0, 2, 1, 3)
    return out, keys, values


class FusedOps(NamedTuple):
    """One implementation of each op; `ops_for` picks once, callers skip the per-call checks."""

    add_rms_norm: Callable
    attention_heads: Callable
    swiglu: Callable
    norm_gemv: Callable
    norm_gemv_heads: Callable
    gemv: Callable
    attention_cached: Callable
    gemv_fits: Callable  # (rows, inner dims, dtype, head_dim) -> whether a forward takes the gemv ops


CUDA_OPS = FusedOps(_add_rms_norm_cuda, _attention_heads_cuda, _swiglu_cuda, _norm_gemv_cuda, _norm_gemv_heads_cuda, _gemv_cuda,
                    _attention_cached_cuda, gemv_fits)
# elsewhere MLX's matmul does better than a norm_gemv emulated with plain ops
MLX_OPS = FusedOps(_add_rms_norm_mlx, _attention_heads_mlx, _swiglu_mlx, _norm_gemv_mlx, _norm_gemv_heads_mlx, _gemv_mlx,
                   _attention_cached_mlx, lambda rows, dims, dtype, head_dim: False)


def ops_for(dtype: mx.Dtype) -> FusedOps:
    """The CUDA kernels when ops built now run on CUDA in a dtype they take; else plain MLX ops."""
    return CUDA_OPS if dtype in _CUDA_TYPES and cuda_active() else MLX_OPS
