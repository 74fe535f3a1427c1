"""DoRA and LoRA adapters on linear layers, in mlx-lm's adapter format.

DoRA (Liu et al. 2024): W' = m * (W + s*B^T A^T) / ||W + s*B^T A^T|| row-wise, with m the row
norms of W and B = 0 at the start, so a fresh adapter leaves the model unchanged. The same
names as mlx-lm (`<layer>.linear`, `.lora_a` (in, r), `.lora_b` (r, out), `.m` (out,)) and
the same math, so adapter folders (`adapters.safetensors` + `adapter_config.json`) move
between stratlm and mlx-lm. The wrapped layer may be quantized (QDoRA).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from stratlm.core.errors import ConfigError, ModelLoadError
from stratlm.core.model import LoadedModel
from stratlm.loaders.folder import read_json_object
from stratlm.core.log import get_logger
from stratlm.backends.cpu.quantized import use_cpu_kernels

log = get_logger(__name__)

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
FINE_TUNE_TYPES = ("dora", "lora")


# -- the layers ------------------------------------------------------------------------------------
def dense_weight(linear: nn.Module) -> mx.array:
    """The (out, in) weight of a Linear or QuantizedLinear."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return linear.weight


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """y = linear(x) + s * dropout(x) A B."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = linear_dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def delta(self) -> mx.array:
        """s * B^T A^T: the (out, in) low-rank update."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def fused_weight(self) -> mx.array:
        weight = dense_weight(self.linear)
        return weight + self.delta().astype(weight.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain (or, over a quantized base, re-quantized) linear layer computing the same function."""
        base = self.linear
        in_dims, out_dims = linear_dims(base)
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = self.fused_weight()
        if "bias" in base:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused


class DoRALinear(LoRALinear):
    """y = m / ||W + sB^T A^T|| * (x W^T + s dropout(x) A B) (+ bias); the norm is not differentiated (as in mlx-lm)."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        w = dense_weight(self.linear)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        out = x @ w.T + (self.scale * z).astype(x.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(w + self.delta(), axis=1))
        out = (self.m / denom).astype(x.dtype) * out
        if "bias" in self.linear:
            out = out + self.linear.bias
        return out

    def fused_weight(self) -> mx.array:
        weight = super().fused_weight()
        return (self.m / mx.linalg.norm(weight, axis=1))[:, None] * weight


LAYER_CLASSES = {"dora": DoRALinear, "lora": LoRALinear}


# -- which layers ----------------------------------------------------------------------------------
@attrs.frozen
class AdapterConfig:
    """Where adapters go and their shape. `layers`: block indices (default: the last `num_layers`,
    -1 = every block); `keys`: module paths inside a block (default: every linear layer, i.e. all
    attention and MLP projections); short names such as "q_proj" are accepted."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1
    layers: tuple[int, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(int(i) for i in v))
    keys: tuple[str, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(v))
    fine_tune_type: str = "dora"

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ConfigError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ConfigError(f"adapter scale must be a finite number, got {self.scale!r}")
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ConfigError(f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got {self.fine_tune_type!r}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise ConfigError(f"num_layers must be a positive number of blocks or -1 (all), got {self.num_layers}")

    def block_indices(self, n_blocks: int) -> list[int]:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_blocks]
            if bad:
                raise ConfigError(f"adapter layer(s) {bad} are outside the model, which has blocks 0..{n_blocks - 1}")
            return sorted(set(self.layers))
        if self.num_layers > n_blocks:
            raise ConfigError(f"num_layers={self.num_layers} but the model has only {n_blocks} blocks; use -1 for all")
        n = n_blocks if self.num_layers == -1 else self.num_layers
        return list(range(n_blocks - n, n_blocks))


def linear_paths(block: nn.Module) -> list[str]:
    """Paths of the block's linear layers (an adapted layer counts once, by its wrapper's path)."""
    modules = block.named_modules()
    wrapped = {p for p, m in modules if isinstance(m, LoRALinear)}
    return [p for p, m in modules if p in wrapped or (isinstance(m, (nn.Linear, nn.QuantizedLinear)) and p.rsplit(".", 1)[0] not in wrapped)]


def resolve_keys(block: nn.Module, keys: Sequence[str] | None) -> list[str]:
    """Module paths inside a block for the requested keys (full paths or final names)."""
    available = linear_paths(block)
    if keys is None:
        return sorted(available)
    found = []
    for key in keys:
        matches = [p for p in available if p == key or p.rsplit(".", 1)[-1] == key]
        if not matches:
            raise ConfigError(f"adapter target {key!r} is not a linear layer of this model's blocks; available: {', '.join(sorted(available))}")
        found += matches
    return sorted(set(found))


def add_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap the chosen linear layers of `model` (in place) in fresh adapters; returns the wrapped paths.

    The model's other parameters are frozen; only the adapters' lora_a, lora_b (and m) train.
    """
    model.freeze()
    layer_class = LAYER_CLASSES[config.fine_tune_type]
    blocks = model.layers
    wrapped = []
    for i in config.block_indices(len(blocks)):
        block = blocks[i]
        keys = resolve_keys(block, config.keys)
        modules = dict(block.named_modules())
        if any(isinstance(modules[k], LoRALinear) for k in keys):
            raise ConfigError(f"block {i} already has adapters; fuse them first (fuse) or start from the base model")
        replacements = [(k, layer_class(modules[k], config.rank, config.scale, config.dropout)) for k in keys]
        block.update_modules(tree_unflatten(replacements))
        wrapped += [f"{block_prefix(model, i)}.{k}" for k in keys]
    mx.eval(model.trainable_parameters())
    return wrapped


def block_prefix(model: nn.Module, index: int) -> str:
    """The parameter-name prefix of block `index` (model.layers.N in the Hugging Face layout)."""
    target = model.layers[index]
    for path, module in model.named_modules():
        if module is target and path.split(".")[-1] == str(index):
            return path
    raise ConfigError(f"block {index} is not reachable from the model's modules")


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter parameters by their mlx-lm names (lora_a, lora_b and m of every adapted layer)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES and ".linear." not in k}


# -- files -------------------------------------------------------------------------------------------
def mlx_lm_config(model: nn.Module, config: AdapterConfig, **extra: Any) -> dict[str, Any]:
    """adapter_config.json as mlx-lm writes and reads it. mlx-lm adapts the last `num_layers` blocks,
    so an explicit layer range is written as "from its first block to the end"; blocks without
    weights in the file stay at their (identity) initialisation there."""
    n_blocks = len(model.layers)
    indices = config.block_indices(n_blocks)
    keys = sorted({k for i in indices for k in resolve_keys(model.layers[i], config.keys)})
    return {
        "fine_tune_type": config.fine_tune_type,
        "num_layers": n_blocks - min(indices),
        "lora_parameters": {"rank": config.rank, "scale": config.scale, "dropout": config.dropout, "keys": keys},
        "stratlm": {"layers": indices, **extra},
    }


def save_adapter(model: nn.Module, out: str | Path, config: AdapterConfig, **extra: Any) -> Path:
    """Write adapters.safetensors + adapter_config.json (mlx-lm's layout)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    if not weights:
        raise ConfigError("the model has no adapter layers to save; add adapters first (add_adapters)")
    mx.save_safetensors(str(out / ADAPTER_FILE), weights)
    (out / CONFIG_FILE).write_text(json.dumps(mlx_lm_config(model, config, **extra), indent=2))
    return out


def read_adapter_config(path: Path) -> tuple[AdapterConfig, dict[str, Any]]:
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.exists():
        raise ModelLoadError(f"{path} is not an adapter folder: it needs {CONFIG_FILE} and {ADAPTER_FILE}")
    raw = read_json_object(cfg_path, "fine_tune_type, num_layers, lora_parameters")
    kind = raw.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise ModelLoadError(f"{cfg_path}: fine_tune_type {kind!r} is not an adapter stratlm reads; supported: {', '.join(FINE_TUNE_TYPES)}")
    params = raw.get("lora_parameters") or {}
    if "scale" not in params or "rank" not in params:
        raise ModelLoadError(f"{cfg_path}: lora_parameters needs 'rank' and 'scale' (mlx-lm's names), got {sorted(params)}")
    layers = (raw.get("stratlm") or {}).get("layers")
    try:
        config = AdapterConfig(rank=int(params["rank"]), scale=float(params["scale"]), dropout=float(params.get("dropout", 0.0)),
                               num_layers=int(raw.get("num_layers", -1)), layers=layers, keys=params.get("keys"), fine_tune_type=kind)
    except ConfigError as exc:
        raise ModelLoadError(f"{cfg_path}: {exc}") from exc
    return config, raw


def load_adapter_weights(model: nn.Module, path: str | Path, config: AdapterConfig | None = None) -> nn.Module:
    """Add the folder's adapters to `model` (in place) and load their weights; shapes and names are checked."""
    path = Path(path)
    file_config, _ = read_adapter_config(path) if config is None else (config, None)
    weights_path = path / ADAPTER_FILE
    if not weights_path.exists():
        raise ModelLoadError(f"{path} has {CONFIG_FILE} but no {ADAPTER_FILE}")
    try:
        weights = mx.load(str(weights_path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {weights_path}: {exc}") from exc
    n_blocks = len(model.layers)
    if file_config.layers is None and file_config.num_layers > n_blocks:
        raise ModelLoadError(f"the adapter in {path} is for a model with at least {file_config.num_layers} blocks; this model has {n_blocks}: "
                             "it was trained for another architecture")
    try:
        add_adapters(model, file_config)
    except ConfigError as exc:
        raise ModelLoadError(f"the adapter in {path} does not fit this model: {exc}") from exc
    expected = adapter_weights(model)
    problems = [f"{k}: not an adapter parameter of this model" for k in weights if k not in expected]
    problems += [f"{k}: shape {tuple(v.shape)} in the adapter, {tuple(expected[k].shape)} in the model"
                 for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ModelLoadError(f"the adapter in {path} was made for another architecture or size: {shown}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


# -- whole models -------------------------------------------------------------------------------------
def copy_loaded(loaded: LoadedModel) -> LoadedModel:
    """A LoadedModel with its own copy of the network (the original is left as it was)."""
    return loaded.replace(model=copy.deepcopy(loaded.model))


def with_adapter(loaded: LoadedModel, path: str | Path) -> LoadedModel:
    """A copy of `loaded` with the adapter folder applied (the load_adapter hook)."""
    result = copy_loaded(loaded)
    load_adapter_weights(result.model, path)
    return result.replace(source=f"{loaded.source}+{Path(path).name}")


def fuse_model(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter into its base layer, in place; returns the model. Re-quantized layers go
    back on stratlm's CPU kernels on the CPU, as load_model puts them (MLX's own quantized matmul
    is slow there: a healed draft ran at a quarter of greedy's speed)."""
    fused = [(p, layer.fuse(dequantize)) for p, layer in adapter_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
        use_cpu_kernels(model)
    model.unfreeze()
    mx.eval(model.parameters())
    return model


def fuse(loaded: LoadedModel, dequantize: bool = False) -> LoadedModel:
    """Transform: a copy with adapters merged into the base weights (an ordinary model again)."""
    result = copy_loaded(loaded)
    fuse_model(result.model, dequantize)
    return result


def _names(value: Any) -> tuple | None:
    """A list option as Python or as command-line text: ("q_proj", "v_proj") or "q_proj+v_proj"."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    return tuple(part.strip() for part in str(value).split("+") if part.strip())


def dora(loaded: LoadedModel, adapter: str | Path | None = None, rank: int | None = None, scale: float | None = None,
         dropout: float | None = None, num_layers: int | None = None, layers: Any = None, keys: Any = None,
         fine_tune_type: str | None = None) -> LoadedModel:
    """Transform: DoRA (or LoRA) adapters. With `adapter` (an mlx-lm adapter folder): a copy with it
    applied, unmerged (add the "fuse" transform to merge it). Without: a copy with fresh trainable
    adapters (rank, scale, dropout; `keys` e.g. "q_proj+v_proj", default every linear layer;
    `layers` e.g. "0+3" or the last `num_layers` blocks, default all; fine_tune_type dora|lora)."""
    shape = {"rank": rank, "scale": scale, "dropout": dropout, "num_layers": num_layers, "layers": layers, "keys": keys, "fine_tune_type": fine_tune_type}
    given = {k: v for k, v in shape.items() if v is not None}
    if adapter is not None:
        if given:
            raise ConfigError(f"transform 'dora' with adapter= takes the adapter's own settings; leave out {', '.join(sorted(given))} "
                              "(or leave out adapter= for fresh adapters)")
        return with_adapter(loaded, adapter)
    if "layers" in given:
        given["layers"] = [int(i) for i in _names(given["layers"])]
    if "keys" in given:
        given["keys"] = _names(given["keys"])
    result = copy_loaded(loaded)
    add_adapters(result.model, AdapterConfig(**given))
    return result.replace(source=f"{loaded.source}+{given.get('fine_tune_type', 'dora')}")
