"""Each rank reads only its part of the checkpoint: from safetensors files the slices themselves
(through a memory map, so the pages of other ranks' rows are never read); from a GGUF file, which
MLX reads whole, the quantized tensors are cut before anything is expanded or converted, and the
rest is freed once the slices are copied out."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from stratlm.core.errors import ModelLoadError
from stratlm.core.model import ModelFamily
from stratlm.loaders.weights import assemble

from .plan import Piece, ShardPlan, piece

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "U32": np.uint32, "I32": np.int32,
                      "I64": np.int64, "U16": np.uint16, "I16": np.int16, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


@attrs.frozen
class Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    end: int


def safetensors_entries(paths: list[Path]) -> dict[str, Entry]:
    """Every tensor's file, dtype, shape and bytes, from the files' headers alone."""
    entries = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}: corrupt or not a safetensors file ({exc})") from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ModelLoadError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which stratlm does not read")
            begin, end = info["data_offsets"]
            entries[name] = Entry(path, info["dtype"], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


def read_piece(entry: Entry, part: Piece, maps: dict[Path, np.memmap]) -> mx.array:
    """The piece of one tensor, read through the file's memory map (only its pages are touched)."""
    if part.zero:
        dtype = mx.bfloat16 if entry.dtype == "BF16" else getattr(mx, np.dtype(SAFETENSORS_DTYPES[entry.dtype]).name)
        return mx.zeros(entry.shape, dtype)
    if entry.path not in maps:
        maps[entry.path] = np.memmap(entry.path, dtype=np.uint8, mode="r")
    data = maps[entry.path][entry.start : entry.end].view(SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)
    if part.axis is not None:
        index = [slice(None)] * data.ndim
        index[part.axis] = slice(part.lo, part.hi)
        data = data[tuple(index)]
    array = mx.array(np.ascontiguousarray(data))
    return array.view(mx.bfloat16) if entry.dtype == "BF16" else array


def slice_array(array: mx.array, part: Piece) -> mx.array:
    if part.zero:
        return mx.zeros(array.shape, array.dtype)
    if part.axis is not None:
        index = [slice(None)] * array.ndim
        index[part.axis] = slice(part.lo, part.hi)
        array = array[tuple(index)]
    return mx.contiguous(array)  # a copy: the whole tensor's buffer can then be freed


def shard_folder_weights(paths: list[Path], plan: ShardPlan, group_size: int | None) -> dict[str, mx.array]:
    entries = safetensors_entries(paths)
    shapes = {name: e.shape for name, e in entries.items()}
    maps: dict[Path, np.memmap] = {}
    out = {}
    for name, entry in entries.items():
        part = piece(plan, name, shapes, group_size)
        if part is not None:
            out[part.name] = read_piece(entry, part, maps)
    return out


def shard_loaded_weights(weights: dict[str, mx.array], plan: ShardPlan, group_size: int | None) -> dict[str, mx.array]:
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    out = {}
    for name in list(weights):
        part = piece(plan, name, shapes, group_size)
        array = weights.pop(name)
        if part is not None:
            out[part.name] = slice_array(array, part)
            mx.eval(out[part.name])
        del array
    return out


def stage_family(family: ModelFamily, plan: ShardPlan) -> ModelFamily:
    """The family, building the model of a rank past 0 without what it never runs: the final norm
    and the head (and in a pipeline the embedding)."""
    if plan.rank == 0:
        return family

    def build(config: dict[str, Any]):
        model = family.build(config)
        if plan.mode == "pipeline":
            model.model.pop("embed_tokens", None)
        model.model.pop("norm", None)
        model.pop("lm_head", None)
        return model

    return attrs.evolve(family, build=build)


def build_shard(plan: ShardPlan, config: dict[str, Any], weights: dict[str, mx.array], family: ModelFamily, *, dtype: mx.Dtype,
                group_size: int | None, keep_quantized: bool, where: str):
    return assemble(plan.local_config(config), weights, family=stage_family(family, plan), dtype=dtype, group_size=group_size,
                    keep_quantized=keep_quantized, where=f"{where} (rank {plan.rank}'s part)")
