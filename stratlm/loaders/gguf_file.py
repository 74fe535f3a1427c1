"""Our own GGUF reader: header, metadata table and tensor table parsed and checked in Python
(numpy memmap), so no malformed file reaches native code. MLX's `mx.load` trusted the header's
counts and lengths (a tensor_count of 2**62 or a key length of 2**40 crashed the process) and
reads some tensor types wrongly; here every count, string length, type, dimension, offset and
size is checked against the file before anything is allocated, and problems raise
ModelLoadError naming the file, the field and what it should be.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count;
kv_count entries (string key, u32 value type, value); tensor_count entries (string name, u32
n_dims, n_dims x u64 dims (innermost first), u32 ggml type, u64 offset into the data section);
padding to `general.alignment` (default 32); the data section.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from stratlm.core.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # arrays of arrays occur in the spec; deeper nesting is refused
MAX_KEY_LENGTH = 65535  # keys are short ASCII names ("llama.block_count")

#: ggml type id -> (name, values per block, bytes per block), as ggml.h / gguf-py's GGML_QUANT_SIZES
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# metadata value types: id -> (name, struct format or None for string/array)
_SCALARS = {0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
            4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
            10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d")}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@attrs.frozen
class TensorInfo:
    """One tensor of the table. `shape` is numpy order (outermost first: a Linear's (out, in));
    `offset` is absolute in the file, `nbytes` what its type and shape take."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@attrs.frozen(eq=False)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    alignment: int
    _map: np.ndarray = attrs.field(repr=False)
    #: each metadata key's GGUF value type (an array's: (ARRAY, element type)), for writing it back
    value_types: dict[str, int | tuple[int, int]] = attrs.field(factory=dict, repr=False)

    def raw(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's bytes (uint8, a view into the file's memory map)."""
        return self._map[tensor.offset : tensor.offset + tensor.nbytes]


class _Cursor:
    """Reads little-endian fields from the mapped header, every read bounds-checked."""

    def __init__(self, buf: mmap.mmap, name: str):
        self.buf, self.pos, self.name, self.size = buf, 0, name, len(buf)

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.name} is not a valid GGUF file: {what} (at byte {self.pos} of {self.size}); the file is corrupt or truncated")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.unpack("<Q", f"the length of {what}")
        if limit is not None and length > limit:
            raise self.fail(f"{what} has length {length}, more than {limit}")
        self.need(length, what)
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            # token strings of some files hold partial UTF-8 sequences; keep them readable
            return data.decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary: 10^5 of them), the per-string checks inlined."""
        if count > (self.size - self.pos) // 8:
            raise self.fail(f"{what} claims {count} strings, more than the file holds")
        buf, pos, size, length_at, out = self.buf, self.pos, self.size, _U64.unpack_from, []
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"string {i} of {what} runs past the end of the file")
            (n,) = length_at(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                raise self.fail(f"string {i} of {what} has length {n}, more than the {size - pos} bytes left")
            data = buf[pos : pos + n]
            pos += n
            try:
                out.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(data.decode("utf-8", errors="replace"))
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            value = self.unpack(_SCALARS[vtype][1], what)
            return value
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            etype = self.unpack("<I", f"the element type of {what}")
            count = self.unpack("<Q", f"the length of {what}")
            if etype in _SCALARS:
                itemsize = struct.calcsize(_SCALARS[etype][1])
                if count > (self.size - self.pos) // itemsize:
                    raise self.fail(f"{what} claims {count} {_SCALARS[etype][0]} values, more than the file holds")
                values = np.frombuffer(self.buf, dtype=np.dtype(_NUMPY[etype]).newbyteorder("<"), count=count, offset=self.pos).copy()
                self.pos += count * itemsize
                return values
            if etype == STRING:
                return self.strings(count, what)
            if etype not in (STRING, ARRAY):
                raise self.fail(f"{what} has unknown element type {etype} (known: 0-12)")
            if count > (self.size - self.pos) // 8:  # every string or array takes at least 8 bytes
                raise self.fail(f"{what} claims {count} elements, more than the file holds")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise self.fail(f"{what} has unknown value type {vtype} (known: 0-12)")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF file's header and tensor table; tensor data stays mapped."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        if size < 24:
            raise ModelLoadError(f"{name} is not a GGUF file: {size} bytes, less than the 24-byte header")
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    mapped = np.frombuffer(buf, dtype=np.uint8)
    cur = _Cursor(buf, name)
    if buf[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{name} is not a GGUF file (it should start with the magic 'GGUF', not {buf[:4]!r})")
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in (2, 3):
        raise ModelLoadError(f"{name} is GGUF version {version}; versions 2 and 3 are read (re-convert the model with a current llama.cpp)")
    tensor_count = cur.unpack("<Q", "tensor_count")
    kv_count = cur.unpack("<Q", "kv_count")
    # a metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor entry 8 + 4 + 4 + 8
    if kv_count > (size - cur.pos) // 13:
        raise cur.fail(f"kv_count is {kv_count}, more metadata entries than the file can hold")
    if tensor_count > (size - cur.pos) // 24:
        raise cur.fail(f"tensor_count is {tensor_count}, more tensors than the file can hold")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int | tuple[int, int]] = {}
    for i in range(kv_count):
        key = cur.string(f"the key of metadata entry {i}", limit=MAX_KEY_LENGTH)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.unpack("<I", f"the value type of {key!r}")
        if vtype == ARRAY and cur.pos + 4 <= size:
            value_types[key] = (ARRAY, struct.unpack_from("<I", buf, cur.pos)[0])
        else:
            value_types[key] = vtype
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment is {alignment!r}; it must be a positive power of two")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(tensor_count):
        tname = cur.string(f"the name of tensor {i}", limit=MAX_KEY_LENGTH)
        if tname in seen:
            raise cur.fail(f"tensor {tname!r} appears twice in the tensor table")
        seen.add(tname)
        n_dims = cur.unpack("<I", f"the dimension count of tensor {tname!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {tname!r} has {n_dims} dimensions; 1 to {MAX_DIMS} are valid")
        dims = [cur.unpack("<Q", f"dimension {d} of tensor {tname!r}") for d in range(n_dims)]
        ggml_type = cur.unpack("<I", f"the type of tensor {tname!r}")
        offset = cur.unpack("<Q", f"the data offset of tensor {tname!r}")
        if ggml_type not in GGML_TYPES:
            raise cur.fail(f"tensor {tname!r} has unknown ggml type id {ggml_type} (known: {', '.join(f'{k} {v[0]}' for k, v in sorted(GGML_TYPES.items()))})")
        if any(d == 0 for d in dims):
            raise cur.fail(f"tensor {tname!r} has a zero dimension {dims}")
        infos.append((tname, tuple(dims), ggml_type, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > size:
        raise cur.fail(f"the data section would start at byte {data_offset}, past the end of the file")
    data_size = size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for tname, dims, ggml_type, offset in infos:
        type_name, block, type_size = GGML_TYPES[ggml_type]
        count = 1
        for d in dims:
            count *= d
            if count > data_size * block:  # Python ints: no overflow, and no absurd products kept
                break
        if dims[0] % block:
            raise ModelLoadError(f"{name}: tensor {tname!r} of type {type_name} has {dims[0]} values per row, not a multiple of its block of {block}")
        nbytes = count // block * type_size
        if offset % alignment:
            raise ModelLoadError(f"{name}: tensor {tname!r} starts at data offset {offset}, not a multiple of the alignment {alignment}")
        if offset > data_size or nbytes > data_size - offset:
            raise ModelLoadError(
                f"{name}: tensor {tname!r} ({type_name}, dims {list(dims)}) needs bytes {offset}..{offset + nbytes} of the data section, "
                f"which holds {data_size}; the file is corrupt or truncated"
            )
        tensors[tname] = TensorInfo(tname, tuple(reversed(dims)), ggml_type, data_offset + offset, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelLoadError(f"{name}: tensors {a!r} and {b!r} overlap in the data section; the tensor table is corrupt")
    return GGUFFile(path, version, metadata, tensors, data_offset, alignment, mapped, value_types)
