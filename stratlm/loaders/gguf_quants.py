"""GGUF tensor types, read by each tensor's own type (never by `general.file_type`), vectorized
numpy over blocks. Block layouts follow ggml-quants.c.

What a tensor becomes (`tensor_arrays`):
- kept quantized, exactly, as MLX affine triples (weight, scales, biases; group size 32, the
  layout `mx.quantize` writes): Q4_0, Q4_1 and Q4_K as 4-bit (Q4_K's 6-bit sub-block scales and
  mins applied to its super-block scales give one scale and one min per 32 values), Q8_0, Q5_0,
  Q5_1 and Q5_K as 8-bit (their 5-bit codes stored in 8 bits with the same scale and offset);
- re-quantized to 8-bit affine, group 32 (their scales are per 16 values, or their grid is not
  affine; the 8-bit grid's error is a fraction of the source's own): Q6_K, Q3_K, Q2_K, IQ4_NL;
- dense: F32, F16, BF16, 1-D tensors, and every type when the caller does not keep quantized
  weights (then all are dequantized to fp32, which the loader casts to the model's dtype).
Other ggml types are refused with the tensor's name and type.
"""

from __future__ import annotations

import numpy as np

from stratlm.core.errors import ModelLoadError

from .gguf_file import GGML_TYPES, TensorInfo

QK_K = 256
GROUP_SIZE = 32
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of each block, as fp32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16-byte groups of 32 4-bit codes, ggml's order: low nibbles are values 0-15, high 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Bit i of a little-endian byte string, for i < count (uint8 0/1)."""
    return np.unpackbits(packed, axis=-1, bitorder="little")[..., :count]


# -- codes, scales and offsets: value = scale * code + offset, per sub-block ----------------------
def _affine_32(name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Types whose value is scale * code + offset per 32 values: (codes (n, k, 32) uint8, scales (n, k), offsets (n, k))."""
    n = blocks.shape[0]
    if name == "Q4_0":
        d = _f16(blocks, 0)
        return _nibbles(blocks[:, 2:18])[:, None], d, -8 * d
    if name == "Q4_1":
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        return _nibbles(blocks[:, 4:20])[:, None], d, m
    if name == "Q5_0":
        d = _f16(blocks, 0)
        high = _bits(blocks[:, 2:6], 32)
        return (_nibbles(blocks[:, 6:22]) | (high << 4))[:, None], d, -16 * d
    if name == "Q5_1":
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        high = _bits(blocks[:, 4:8], 32)
        return (_nibbles(blocks[:, 8:24]) | (high << 4))[:, None], d, m
    if name == "Q8_0":
        d = _f16(blocks, 0)
        codes = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes[:, None], d, -128 * d
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if name == "Q4_K":
            qs = blocks[:, 16:144].reshape(n, 4, 32)
            codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
        else:
            qh, qs = blocks[:, 16:48], blocks[:, 48:176].reshape(n, 4, 32)
            low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
            high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # sub-block s: bit s
            codes = low | (high << 4)
        return codes, d * sc, -(dmin * mn)
    raise AssertionError(name)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 six-bit scales and mins packed in 12 bytes (get_scale_min_k4)."""
    q = scales.astype(np.uint8)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequant_16(name: str, blocks: np.ndarray) -> np.ndarray:
    """Types with 16-value sub-blocks or a non-affine grid -> fp32 values (n, block)."""
    n = blocks.shape[0]
    if name == "Q6_K":
        ql, qh = blocks[:, 0:128].reshape(n, 2, 2, 32), blocks[:, 128:192].reshape(n, 2, 1, 32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks, 208)
        # half h, group g (0-3) of 32: low nibble of ql[h, g % 2] for g < 2, high for g >= 2; qh bits 2g, 2g+1
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, 2, 4, 32)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
        q = (low | (high << 4)).astype(np.float32) - 32
        return ((d * sc).reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(n, QK_K)
    if name == "Q2_K":
        scales, qs = blocks[:, 0:16], blocks[:, 16:80].reshape(n, 2, 1, 32)
        d, dmin = _f16(blocks, 80), _f16(blocks, 82)
        q = ((qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).astype(np.float32).reshape(n, 16, 16)
        scale = (d * (scales & 0x0F)).reshape(n, 16, 1)
        offset = (dmin * (scales >> 4)).reshape(n, 16, 1)
        return (scale * q - offset).reshape(n, QK_K)
    if name == "Q3_K":
        hmask, qs, packed = blocks[:, 0:32], blocks[:, 32:96].reshape(n, 2, 1, 32), blocks[:, 96:108]
        d = _f16(blocks, 108)
        k = np.arange(16)
        low = (packed[:, k % 8] >> (4 * (k // 8)).astype(np.uint8)) & 0x0F
        high = (packed[:, 8 + k % 4] >> (2 * (k // 4)).astype(np.uint8)) & 3
        sc = (low | (high << 4)).astype(np.float32) - 32
        q2 = ((qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).astype(np.int8)  # (n, 2, 4, 32)
        hbit = ((hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(n, 2, 4, 32)  # bit 4h + j
        q = (q2 - 4 * (1 - hbit).astype(np.int8)).astype(np.float32).reshape(n, 16, 16)
        return ((d * sc).reshape(n, 16, 1) * q).reshape(n, QK_K)
    if name == "IQ4_NL":
        d = _f16(blocks, 0)
        return d * IQ4_NL_VALUES[_nibbles(blocks[:, 2:18])]
    raise AssertionError(name)


AFFINE_4BIT = ("Q4_0", "Q4_1", "Q4_K")
AFFINE_8BIT = ("Q8_0", "Q5_0", "Q5_1", "Q5_K")
REQUANTIZED = ("Q6_K", "Q3_K", "Q2_K", "IQ4_NL")
FLOAT = ("F32", "F16", "BF16")
SUPPORTED = FLOAT + AFFINE_4BIT + AFFINE_8BIT + REQUANTIZED


def _blocks(raw: np.ndarray, type_name: str) -> np.ndarray:
    _, _, type_size = next(v for v in GGML_TYPES.values() if v[0] == type_name)
    return np.asarray(raw, dtype=np.uint8).reshape(-1, type_size)


def unsupported(tensor_name: str, type_name: str) -> ModelLoadError:
    return ModelLoadError(
        f"tensor {tensor_name!r} has GGUF type {type_name}, which stratlm does not read; supported: {', '.join(SUPPORTED)} "
        "(use a file quantized to one of those, e.g. Q4_K_M or Q8_0)"
    )


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], tensor_name: str = "tensor") -> np.ndarray:
    """A tensor's bytes -> fp32 values of `shape` (numpy order)."""
    if type_name == "F32":
        return np.asarray(raw).view(np.float32).reshape(shape).copy()
    if type_name == "F16":
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        return (np.asarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if type_name in AFFINE_4BIT + AFFINE_8BIT:
        codes, scales, offsets = _affine_32(type_name, _blocks(raw, type_name))
        return (scales[..., None] * codes.astype(np.float32) + offsets[..., None]).reshape(shape)
    if type_name in REQUANTIZED:
        return _dequant_16(type_name, _blocks(raw, type_name)).reshape(shape)
    raise unsupported(tensor_name, type_name)


def _pack4(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout (byte i: value i in the low nibble, value i + half in the high) ->
    MLX's (byte i: values 2i and 2i+1), straight from the bytes: the low nibbles of a byte pair
    make one output byte, their high nibbles another."""
    a, b = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(a & 0x0F) | (b << 4), (a >> 4) | (b & 0xF0)], axis=-1)


def affine(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """An exactly affine type as MLX's quantized triple: (packed uint32 (rows, cols*bits/32),
    scales (rows, cols/32) fp32, biases fp32, bits); value = scale * code + bias, the codes packed
    as `mx.quantize` packs them (value k of a word in bits k*bits)."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    blocks = _blocks(raw, type_name)
    if type_name in AFFINE_4BIT:  # repacked from the bytes without unpacking the codes (load time)
        n = blocks.shape[0]
        if type_name == "Q4_0":
            d = _f16(blocks, 0)
            packed, scales, offsets = _pack4(blocks[:, 2:18]), d, -8 * d
        elif type_name == "Q4_1":
            packed, scales, offsets = _pack4(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2)
        else:
            d, dmin = _f16(blocks, 0), _f16(blocks, 2)
            sc, mn = _k_scale_min(blocks[:, 4:16])
            packed, scales, offsets = _pack4(blocks[:, 16:144].reshape(n, 4, 32)), d * sc, -(dmin * mn)
        packed, bits = packed.reshape(rows, cols // 2), 4
    else:
        codes, scales, offsets = _affine_32(type_name, blocks)
        packed, bits = codes.reshape(rows, cols), 8
    packed = np.ascontiguousarray(packed).view(np.uint32).reshape(*shape[:-1], cols * bits // 32)
    groups = (*shape[:-1], cols // GROUP_SIZE)
    return packed, scales.reshape(groups).astype(np.float32), offsets.reshape(groups).astype(np.float32), bits


def tensor_arrays(tensor: TensorInfo, raw: np.ndarray, *, keep_quantized: bool) -> dict[str, "object"]:
    """One GGUF tensor -> the MLX arrays its parameter takes: {"": dense} or, for a kept quantized
    weight (2-D, or MoE experts stacked in 3-D), {"": packed, "scales": ..., "biases": ...}
    (suffixes replace ".weight"'s tail)."""
    import mlx.core as mx

    type_name = tensor.type_name
    if type_name not in SUPPORTED:
        raise unsupported(tensor.name, type_name)
    # 2-D weights, and MoE experts stacked (experts, out, in): their layers run gather_qmm
    quantizable = keep_quantized and len(tensor.shape) >= 2 and tensor.shape[-1] % GROUP_SIZE == 0
    if quantizable and type_name in AFFINE_4BIT + AFFINE_8BIT:
        packed, scales, biases, _ = affine(raw, type_name, tensor.shape)
        return {"": mx.array(packed), "scales": mx.array(scales), "biases": mx.array(biases)}
    dense = dequantize(raw, type_name, tensor.shape, tensor.name)
    if quantizable and type_name in REQUANTIZED:
        w, scales, biases = mx.quantize(mx.array(dense), group_size=GROUP_SIZE, bits=8)
        return {"": w, "scales": scales, "biases": biases}
    return {"": mx.array(dense)}


# -- quantizers (numpy): what `stratlm convert` and the tests write ---------------------------------
def _to_f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K: per 32 values a 4-bit code with a scale and a min, both 6-bit multiples of the
    super-block's fp16 d and dmin (a direct min/max fit, not llama.cpp's iterative search)."""
    n = x.shape[0]
    x = x.reshape(n, 8, 32)
    lo = np.minimum(x.min(axis=2), 0)
    scale = (x.max(axis=2) - lo) / 15
    mins = -lo
    d = (scale.max(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.rint(np.where(d > 0, scale / d, 0)), 0, 63).astype(np.uint8)
        m = np.clip(np.rint(np.where(dmin > 0, mins / dmin, 0)), 0, 63).astype(np.uint8)
        step, offset = (d * sc)[..., None], (dmin * m)[..., None]
        q = np.clip(np.rint(np.where(step > 0, (x + offset) / step, 0)), 0, 15).astype(np.uint8)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # chunk c: sub-block 2c low nibbles, 2c+1 high
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(dmin), packed, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: per 16 values a signed 6-bit code and an int8 scale times the super-block's fp16 d."""
    n = x.shape[0]
    x = x.reshape(n, 16, 16)
    pick = np.take_along_axis(x, np.abs(x).argmax(axis=2)[..., None], axis=2)[..., 0]
    scale = pick / -32  # the largest magnitude lands on -32 exactly, as ggml's make_qx_quants
    d = (np.abs(scale).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.rint(np.where(d > 0, scale / d, 0)), -128, 127).astype(np.int8)
        step = (d * sc)[..., None]
        q = (np.clip(np.rint(np.where(step != 0, x / step, 0)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    low, high = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, :, 0:2] | (low[:, :, 2:4] << 4)], axis=2).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _to_f16_bytes(d)], axis=1)


def _symmetric_fit(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes in [-nmax, nmax - 1] and a scale per row minimising the squared error: ggml's
    make_qx_quants search (19 trial scales around max/nmax, each refit by least squares)."""
    pick = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    best_d, best_q, best_score = np.zeros_like(pick), np.zeros(x.shape, np.int8), np.full(pick.shape, -1.0, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(-9, 10):
            inv = np.where(pick != 0, -(nmax + 0.1 * t) / pick, 0)
            q = np.clip(np.rint(x * inv), -nmax, nmax - 1)
            sum_xq, sum_qq = (x * q).sum(axis=1, keepdims=True), (q * q).sum(axis=1, keepdims=True)
            d = np.where(sum_qq > 0, sum_xq / sum_qq, 0)
            score = np.where(sum_qq > 0, sum_xq * d, 0)  # the error falls by d * sum(x q) with the fitted d
            better = score > best_score
            best_d, best_score = np.where(better, d, best_d), np.where(better, score, best_score)
            best_q = np.where(better, q, best_q).astype(np.int8)
    return best_d.astype(np.float32), best_q


def _q5_0(x: np.ndarray) -> np.ndarray:
    """Q5_0: per 32 values an fp16 d and 5-bit codes, value = d * (code - 16), the scale searched
    for the least squared error (ggml's reference rounds max/-16 only: ~1.3x the error)."""
    d, q = _symmetric_fit(x, 16)
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # codes for the fp16-rounded scale
        q = np.where(d16 != 0, np.clip(np.rint(x / d16), -16, 15), 0)
    q = (q + 16).astype(np.uint8)
    qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_to_f16_bytes(d16), qh, qs], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    """Q5_1: per 32 values an fp16 scale and min and 5-bit codes, value = d * code + m."""
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = ((hi - lo) / 31).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(np.where(d > 0, (x - m) / d, 0)), 0, 31).astype(np.uint8)
    qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(m), qh, qs], axis=1)


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, 1 / d, 0)
    q = np.rint(x * inv).astype(np.int8)
    return np.concatenate([_to_f16_bytes(d), q.view(np.uint8)], axis=1)


QUANTIZERS = {"Q4_K": _q4_k, "Q6_K": _q6_k, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0}


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """fp32 values (rows, cols) -> the type's bytes (rows, cols / block * block bytes), as GGUF stores them."""
    if type_name == "F32":
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)
    if type_name == "F16":
        return np.ascontiguousarray(values, dtype=np.float16).view(np.uint8)
    if type_name not in QUANTIZERS:
        raise ModelLoadError(f"cannot quantize to {type_name}; stratlm writes {', '.join(('F32', 'F16', *QUANTIZERS))}")
    _, block, type_size = next(v for v in GGML_TYPES.values() if v[0] == type_name)
    values = np.asarray(values, dtype=np.float32)
    if values.shape[-1] % block:
        raise ModelLoadError(f"{type_name} needs rows of a multiple of {block} values, not {values.shape[-1]}")
    rows = values.reshape(-1, block)
    return QUANTIZERS[type_name](rows).reshape(*values.shape[:-1], values.shape[-1] // block * type_size)
