"""The GGUF loader: a `.gguf` file read and checked by our own reader (gguf_file), each tensor
converted by its own type (gguf_quants). What the tensors are called, how the
config reads from the metadata, RoPE scaling, Q/K row order and the tokenizer are the family's
(its ModelFamily.gguf); this module knows the file format only."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import mlx.core as mx

from stratlm.core.errors import ModelLoadError, StratlmError
from stratlm.core.loader import Loader
from stratlm.core.model import LoadedModel, ModelFamily
from stratlm.core.registry import Registry

from .gguf_file import read_gguf
from .gguf_quants import GROUP_SIZE, tensor_arrays
from .gguf_tokenizer import gguf_tokenizer
from .weights import assemble

GGUF_GROUP_SIZE = GROUP_SIZE  # every quantized GGUF tensor becomes MLX affine groups of 32


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


def read_tensors(path: Path, keep_quantized: bool) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """(metadata, tensors by GGUF name): quantized weights kept as "<name>.weight/.scales/.biases"."""
    gguf = read_gguf(path)
    tensors: dict[str, mx.array] = {}
    for info in gguf.tensors.values():
        arrays = tensor_arrays(info, gguf.raw(info), keep_quantized=keep_quantized)
        stem = info.name[: -len(".weight")] if info.name.endswith(".weight") else info.name
        for suffix, array in arrays.items():
            tensors[f"{stem}.{suffix}" if suffix else info.name] = array
    return gguf.metadata, tensors


def check_blocks(config: dict[str, Any], raw: dict[str, mx.array], name: str) -> None:
    """The metadata's block count against the file's blk.N tensors (a corrupt count would build
    a model of millions of layers before the weights could disagree)."""
    blocks = {k.split(".")[1] for k in raw if k.startswith("blk.")}
    layers = config.get("num_hidden_layers")
    if blocks and layers != len(blocks):
        raise ModelLoadError(f"{name}: the metadata says {layers} blocks but the file has tensors for {len(blocks)}; the file is corrupt")


def read_model_tensors(path: Path, registry: Registry, keep_quantized: bool) -> tuple[ModelFamily, dict[str, Any], dict[str, mx.array], dict[str, Any]]:
    """The family, the Hugging Face style config, the tensors under the model's names (Q/K rows in
    the Hugging Face order) and the metadata of a GGUF file."""
    meta, raw = read_tensors(path, keep_quantized)
    family = family_for_gguf(str(meta.get("general.architecture", "")), registry, path.name)
    spec = family.gguf
    factors = raw.pop("rope_freqs.weight", None)
    with metadata_errors(path, family):
        config = spec.config(meta, raw, family.model_types[0])
        check_blocks(config, raw, path.name)
        if factors is not None:
            if spec.rope_scaling is None:
                raise ModelLoadError(f"{path.name} has rope frequency factors, which a {family.name} model does not take")
            config["rope_scaling"] = spec.rope_scaling(factors, config, path.name)
        weights = {spec.parameter_name(k): v for k, v in raw.items()}
        if spec.unpermute_qk is not None:
            weights = spec.unpermute_qk(weights, config)
    return family, config, weights, meta


@contextlib.contextmanager
def metadata_errors(path: Path, family: ModelFamily):
    try:
        yield
    except (KeyError, TypeError, ValueError, ArithmeticError, IndexError) as exc:
        # metadata that disagrees with itself or with the tensors (a corrupt or hand-edited file)
        raise ModelLoadError(f"{path.name}: its metadata does not describe a valid {family.name} model ({type(exc).__name__}: {exc})") from exc


def model_tokenizer(path: Path, family: ModelFamily, meta: dict[str, Any]):
    try:
        return (family.gguf.tokenizer or gguf_tokenizer)(meta)
    except StratlmError:
        raise
    except Exception as exc:  # the tokenizers library raises plain Exception ("Error while initializing BPE")
        raise ModelLoadError(f"{path.name}: its tokenizer cannot be built from the tokenizer.ggml.* metadata (corrupt vocabulary or merges?): {exc}") from exc


def load_gguf(path: Path, registry: Registry, dtype: mx.Dtype, keep_quantized: bool, source: str = "") -> LoadedModel:
    family, config, weights, meta = read_model_tensors(path, registry, keep_quantized)
    with metadata_errors(path, family):
        model = assemble(config, weights, family=family, dtype=dtype, group_size=GGUF_GROUP_SIZE, keep_quantized=keep_quantized, where=str(path))
    return LoadedModel(model=model, tokenizer=model_tokenizer(path, family, meta), family=family, source=source or str(path), path=path)
