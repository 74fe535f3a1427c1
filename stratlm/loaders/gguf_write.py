"""Writing GGUF files (v3) and re-quantizing one: what `stratlm convert --quantize q4_k_m` and
the tests use. The Q4_K_M recipe is llama.cpp's (llama-quant.cpp), by GGUF tensor name:
Q4_K by default; Q6_K for the output head (the token embedding when it is tied) and for
attn_v and ffn_down of the layers `use_more_bits` picks; 1-D tensors F32. A K-quant needs
rows of a multiple of 256 values; where a row is shorter llama.cpp falls back, and so do we:
Q4_K -> Q5_0, Q6_K -> Q8_0 (SmolLM2-135M's width of 576 makes most of its tensors Q5_0)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from stratlm.core.errors import ModelLoadError

from .gguf_file import ARRAY, GGML_TYPES, STRING, _SCALARS, read_gguf
from .gguf_quants import QK_K, dequantize, quantize

TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}
FILE_TYPE_Q4_K_M = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M
FALLBACK = {"Q4_K": "Q5_1", "Q6_K": "Q8_0", "Q5_K": "Q5_1"}
_NUMPY_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2, np.dtype(np.int16): 3, np.dtype(np.uint32): 4,
                np.dtype(np.int32): 5, np.dtype(np.float32): 6, np.dtype(np.bool_): 7, np.dtype(np.uint64): 10, np.dtype(np.int64): 11,
                np.dtype(np.float64): 12}


def _guess_type(value: Any) -> int | tuple[int, int]:
    if isinstance(value, bool):
        return 7
    if isinstance(value, int):
        return 4 if 0 <= value < 2**32 else 11
    if isinstance(value, float):
        return 6
    if isinstance(value, str):
        return STRING
    if isinstance(value, np.ndarray):
        return (ARRAY, _NUMPY_TYPES[value.dtype])
    if isinstance(value, (list, tuple)):
        return (ARRAY, STRING) if all(isinstance(v, str) for v in value) else (ARRAY, _guess_type(value[0]) if value else 4)
    raise ModelLoadError(f"cannot write a GGUF metadata value of type {type(value).__name__}")


def _encode(vtype: int | tuple[int, int], value: Any) -> bytes:
    if isinstance(vtype, tuple):
        etype = vtype[1]
        if etype == STRING:
            return struct.pack("<IQ", STRING, len(value)) + b"".join(_string(v) for v in value)
        array = np.asarray(value, dtype=[k for k, v in _NUMPY_TYPES.items() if v == etype][0])
        return struct.pack("<IQ", etype, len(array)) + array.astype(array.dtype.newbyteorder("<")).tobytes()
    if vtype == STRING:
        return _string(value)
    return struct.pack(_SCALARS[vtype][1], value)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: str | Path, metadata: dict[str, Any], tensors: Iterable[tuple[str, tuple[int, ...], str, np.ndarray]],
               value_types: dict[str, int | tuple[int, int]] | None = None, alignment: int = 32) -> Path:
    """tensors: (name, shape in numpy order, ggml type name, bytes). Metadata types come from
    `value_types` where given, else from the Python value (int -> uint32, float -> float32)."""
    path = Path(path)
    tensors = list(tensors)
    value_types = value_types or {}
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        vtype = value_types.get(key) or _guess_type(value)
        header += _string(key) + struct.pack("<I", vtype[0] if isinstance(vtype, tuple) else vtype) + _encode(vtype, value)
    offset = 0
    for name, shape, type_name, data in tensors:
        dims = list(reversed(shape))
        header += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        header += struct.pack("<IQ", TYPE_IDS[type_name], offset)
        offset += -(-data.nbytes // alignment) * alignment
    header += bytes(-len(header) % alignment)
    with open(path, "wb") as f:
        f.write(header)
        for _, _, _, data in tensors:
            f.write(np.ascontiguousarray(data).tobytes())
            f.write(bytes(-data.nbytes % alignment))
    return path


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in a _M mix."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], n_layers: int, tied: bool) -> str:
    """The type llama.cpp's Q4_K_M gives this tensor (after its fallback for short rows)."""
    if len(shape) < 2:
        return "F32"
    base = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    wanted = "Q4_K"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        wanted = "Q6_K"
    elif base in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
        wanted = "Q6_K"
    if shape[-1] % QK_K:
        wanted = FALLBACK[wanted]
    return wanted


RECIPES: dict[str, Callable[[str, tuple[int, ...], int, bool], str]] = {"q4_k_m": q4_k_m_type}


def requantize_gguf(source: str | Path, out: str | Path, recipe: str = "q4_k_m", progress: Callable[[int, int], None] | None = None) -> Path:
    """A GGUF re-quantized by a recipe (each tensor dequantized to fp32 first); metadata kept."""
    if recipe not in RECIPES:
        raise ModelLoadError(f"unknown GGUF quantization {recipe!r}; known: {', '.join(RECIPES)}")
    src = read_gguf(source)
    arch = src.metadata.get("general.architecture")
    n_layers = len({n.split(".")[1] for n in src.tensors if n.startswith("blk.")})
    tied = "output.weight" not in src.tensors
    pick = RECIPES[recipe]
    tensors = []
    for i, info in enumerate(src.tensors.values()):
        values = dequantize(src.raw(info), info.type_name, info.shape, info.name)
        type_name = pick(info.name, info.shape, n_layers, tied)
        tensors.append((info.name, info.shape, type_name, quantize(values, type_name)))
        if progress is not None:
            progress(i + 1, len(src.tensors))
    metadata = dict(src.metadata)
    metadata["general.file_type"] = FILE_TYPE_Q4_K_M
    types = dict(src.value_types, **{"general.file_type": 4})
    if arch is None:
        raise ModelLoadError(f"{source} has no general.architecture")
    return write_gguf(out, metadata, tensors, types)
