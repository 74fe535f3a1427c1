"""The folder loader: config.json + safetensors (sharded with an index too) + tokenizer files,
the layout Hugging Face and mlx-lm write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from stratlm.core.errors import ModelLoadError
from stratlm.core.loader import Loader
from stratlm.core.model import LoadedModel
from stratlm.core.registry import Registry
from stratlm.core.tokenizer import Tokenizer

from .loading import family_for
from .weights import assemble


class FolderLoader(Loader):
    name = "folder"

    def claims(self, source: str) -> bool:
        return Path(source).expanduser().is_dir()

    def load(self, source: str, *, registry: Registry, dtype: mx.Dtype, keep_quantized: bool) -> LoadedModel:
        return load_folder(Path(source).expanduser(), registry, dtype, keep_quantized, source=source)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise ModelLoadError(f"{folder} has no config.json; a model folder needs config.json and *.safetensors")
    return read_json_object(path, "model_type, hidden_size, ...")


def read_json_object(path: Path, holds: str) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file and what it should hold."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object ({holds}), not {type(value).__name__}")
    return value


def safetensors_paths(folder: Path) -> list[Path]:
    """The weight files of a model folder (the index's shards, or every *.safetensors but an adapter's)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index (JSON with a 'weight_map' of name -> file): {exc!r}") from exc
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
        paths = [p for p in paths if p.name != "adapters.safetensors"]
    if not paths:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    for p in paths:
        if not p.exists():
            raise ModelLoadError(f"shard {p.name} listed in model.safetensors.index.json is missing from {folder}")
    return paths


def read_safetensors(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for p in safetensors_paths(folder):
        try:
            weights.update(mx.load(str(p)))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {p}: corrupt or not a safetensors file ({exc})") from exc
    return weights


def quantization_group_size(config: dict[str, Any]) -> int | None:
    """The group size of an mlx-lm quantized folder's weights (None: not quantized)."""
    q = config.get("quantization") or config.get("quantization_config") or {}
    return q.get("group_size") if "bits" in q else None


def load_folder(folder: Path, registry: Registry, dtype: mx.Dtype, keep_quantized: bool, source: str = "") -> LoadedModel:
    config = read_config(folder)
    family = family_for(config, registry)
    weights = read_safetensors(folder)
    model = assemble(config, weights, family=family, dtype=dtype, group_size=quantization_group_size(config), keep_quantized=keep_quantized, where=str(folder))
    return LoadedModel(model=model, tokenizer=folder_tokenizer(folder), family=family, source=source or str(folder), path=folder)


def folder_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer, with every EOS id its generation_config.json and config.json declare."""
    eos = set()
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.exists():
            value = read_json_object(p, "generation settings such as eos_token_id").get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
    return Tokenizer.from_folder(folder, eos)
