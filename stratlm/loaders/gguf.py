"""The GGUF loader: a `.gguf` file read with mx.load. What the tensors are called, how the
config reads from the metadata, RoPE scaling, Q/K row order and the tokenizer are the family's
(its ModelFamily.gguf); this module knows the file format only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from stratlm.core.errors import ModelLoadError
from stratlm.core.loader import Loader
from stratlm.core.model import LoadedModel, ModelFamily
from stratlm.core.registry import Registry

from .gguf_tokenizer import bpe_tokenizer
from .weights import assemble

GGUF_GROUP_SIZE = 32  # Q4_0, Q4_1, Q8_0 blocks
# general.file_type values MLX reads correctly: F32, F16, Q4_0, Q4_1, Q8_0. Its reader gets
# Q4_K wrong (sub-block scales) and fails on others, so those are refused up front.
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0"}


class GGUFLoader(Loader):
    name = "gguf"

    def claims(self, source: str) -> bool:
        return Path(source).suffix == ".gguf"

    def load(self, source: str, *, registry: Registry, dtype: mx.Dtype, keep_quantized: bool) -> LoadedModel:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return load_gguf(path, registry, dtype, keep_quantized, source=source)


def scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def family_for_gguf(arch: str, registry: Registry, name: str) -> ModelFamily:
    families = [e.obj for e in registry.table("model family").values() if e.obj.gguf is not None]
    family = next((f for f in families if arch in f.gguf.architectures), None)
    if family is None:
        supported = sorted(a for f in families for a in f.gguf.architectures)
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {name}; supported: {', '.join(supported)}")
    return family


def read_gguf(path: Path, registry: Registry) -> tuple[ModelFamily, dict[str, Any], dict[str, mx.array], dict[str, Any]]:
    """The family, the Hugging Face style config, the tensors under the model's names (Q/K rows in
    the Hugging Face order) and the metadata of a GGUF file."""
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read {path}: corrupt GGUF or a tensor type MLX cannot load (Q4_0, Q4_1, Q8_0, F16, F32 are supported) ({exc})"
        ) from exc
    file_type = scalar(meta.get("general.file_type"))
    if file_type is not None and int(file_type) not in GGUF_FILE_TYPES:
        raise ModelLoadError(
            f"{path.name} is a GGUF of file type {int(file_type)}, which MLX does not read correctly; "
            f"use one of {', '.join(GGUF_FILE_TYPES.values())} (e.g. the Q8_0 or Q4_0 file of the same model)"
        )
    family = family_for_gguf(str(meta.get("general.architecture", "")), registry, path.name)
    spec = family.gguf
    factors = raw.pop("rope_freqs.weight", None)
    config = spec.config(meta, raw, family.model_types[0])
    if factors is not None:
        if spec.rope_scaling is None:
            raise ModelLoadError(f"{path.name} has rope frequency factors, which a {family.name} model does not take")
        config["rope_scaling"] = spec.rope_scaling(factors, config, path.name)
    weights = {spec.parameter_name(k): v for k, v in raw.items()}
    if spec.unpermute_qk is not None:
        weights = spec.unpermute_qk(weights, config)
    return family, config, weights, meta


def gguf_tokenizer(family: ModelFamily, meta: dict[str, Any]):
    return (family.gguf.tokenizer or bpe_tokenizer)(meta)


def load_gguf(path: Path, registry: Registry, dtype: mx.Dtype, keep_quantized: bool, source: str = "") -> LoadedModel:
    family, config, weights, meta = read_gguf(path, registry)
    model = assemble(config, weights, family=family, dtype=dtype, group_size=GGUF_GROUP_SIZE, keep_quantized=keep_quantized, where=str(path))
    return LoadedModel(model=model, tokenizer=gguf_tokenizer(family, meta), family=family, source=source or str(path), path=path)
