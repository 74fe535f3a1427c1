"""Which part of a model each process holds.

Tensor parallelism splits every block: attention by key/value head groups (each rank's query
heads are those of its KV heads, so no rank needs another's keys), the MLP by intermediate columns.
Head counts that do not divide by the number of processes are split unevenly: SmolLM2's 3 KV
heads (9 query heads) over 2 processes are 2 + 1 KV heads (6 + 3 query heads). Fewer KV heads
than processes is refused (each rank needs at least one). Quantized layers are cut at group
boundaries. Pipeline parallelism gives each rank a contiguous run of blocks; rank 0 also holds
the embedding, the final norm and the head (the last rank hands its hidden state back to it).
"""

from __future__ import annotations

from typing import Any

import attrs

from stratlm.core.errors import ConfigError

MODES = ("tensor", "pipeline")
#: the families whose blocks this splits (the shared Llama-layout transformer with one attention
#: mask for all layers); others (sliding windows, MoE, fused projections) are refused by name
FAMILIES = ("llama", "qwen3")


def split(total: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) ranges over `total` in whole `unit`s, as even as possible (earlier parts get the extra)."""
    units = total // unit
    base, extra = divmod(units, parts)
    ranges, start = [], 0
    for i in range(parts):
        n = (base + (i < extra)) * unit
        ranges.append((start, start + n))
        start += n
    return ranges


@attrs.frozen
class ShardPlan:
    mode: str
    rank: int
    size: int
    head_dim: int = 0
    kv_heads: tuple[int, int] = (0, 0)  # tensor: this rank's KV heads [lo, hi)
    q_heads: tuple[int, int] = (0, 0)
    inter: tuple[int, int] = (0, 0)  # tensor: MLP intermediate columns
    layers: tuple[int, int] = (0, 0)  # pipeline: blocks [lo, hi)

    def features(self, kind: str) -> tuple[int, int]:
        """The rows (column-parallel) or input columns (row-parallel) of one kind of projection."""
        if kind == "q":
            return self.q_heads[0] * self.head_dim, self.q_heads[1] * self.head_dim
        if kind == "kv":
            return self.kv_heads[0] * self.head_dim, self.kv_heads[1] * self.head_dim
        return self.inter

    def local_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config of the model this rank builds (its shapes)."""
        local = dict(config)
        if self.mode == "tensor":
            local.update(num_attention_heads=self.q_heads[1] - self.q_heads[0], num_key_value_heads=self.kv_heads[1] - self.kv_heads[0],
                         intermediate_size=self.inter[1] - self.inter[0], head_dim=self.head_dim)
        else:
            local["num_hidden_layers"] = self.layers[1] - self.layers[0]
        return local


def shapes_of(config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return heads, kv, head_dim, int(config["intermediate_size"]), int(config["num_hidden_layers"])


def make_plan(mode: str, config: dict[str, Any], rank: int, size: int, group_size: int | None = None) -> ShardPlan:
    """This rank's part; ConfigError when the model cannot be split so over `size` processes.
    group_size: the quantization group of a quantized checkpoint kept quantized (cuts align to it)."""
    if mode not in MODES:
        raise ConfigError(f"parallel must be 'tensor' or 'pipeline', got {mode!r}")
    if config.get("model_type", "llama") not in ("llama", "qwen3") or config.get("sliding_window") and config.get("use_sliding_window", True):
        raise ConfigError(f"splitting over processes supports {', '.join(FAMILIES)} models without sliding windows; "
                          f"this one is model_type {config.get('model_type')!r}")
    heads, kv, head_dim, inter, layers = shapes_of(config)
    if mode == "pipeline":
        if layers < size:
            raise ConfigError(f"pipeline parallelism over {size} processes needs at least {size} blocks; this model has {layers}: "
                              f"use at most {layers} processes")
        return ShardPlan(mode, rank, size, layers=split(layers, size)[rank])
    if kv < size:
        raise ConfigError(f"tensor parallelism over {size} processes needs at least {size} key/value heads (each process holds whole heads); "
                          f"this model has {kv} ({heads} query heads): use at most {kv} processes, or parallel='pipeline'")
    if heads % kv:
        raise ConfigError(f"{heads} query heads do not form groups over {kv} key/value heads")
    group = heads // kv
    kv_range = split(kv, size)[rank]
    unit = group_size or 1
    if group_size and any((lo * group * head_dim) % group_size for lo, _ in split(kv, size)):
        raise ConfigError(f"a quantized o_proj's groups of {group_size} columns would straddle the head split ({head_dim}-wide heads); "
                          "use parallel='pipeline' for this checkpoint")
    if inter // unit < size:
        raise ConfigError(f"the MLP's {inter} columns cannot be split over {size} processes in groups of {unit}")
    return ShardPlan(mode, rank, size, head_dim=head_dim, kv_heads=kv_range, q_heads=(kv_range[0] * group, kv_range[1] * group),
                     inter=split(inter, size, unit)[rank])


# -- which slice of each checkpoint tensor a rank reads ---------------------------------------------
COLUMN = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "inter", "up_proj": "inter"}  # output rows split
ROW = {"o_proj": "q", "down_proj": "inter"}  # input columns split, outputs summed over ranks
LAYER_PREFIX = "model.layers."
HEAD_ONLY = ("model.norm.", "lm_head.")  # what only rank 0 runs (the others' hidden state ends at the last block)


@attrs.frozen
class Piece:
    """What a rank keeps of one tensor: `name` in its model, rows/columns [lo, hi) along `axis`
    (None: all of it); `zero`: zeros of the tensor's shape (a row-parallel bias is added once, on rank 0)."""

    name: str
    axis: int | None = None
    lo: int = 0
    hi: int = 0
    zero: bool = False


def piece(plan: ShardPlan, name: str, shapes: dict[str, tuple[int, ...]], group_size: int | None) -> Piece | None:
    """The part of checkpoint tensor `name` this rank holds (None: none of it). shapes: every
    tensor's shape (a quantized weight's packing is read from its scales')."""
    if plan.mode == "pipeline":
        if name.startswith(LAYER_PREFIX):
            index, rest = name[len(LAYER_PREFIX):].split(".", 1)
            lo, hi = plan.layers
            return Piece(f"{LAYER_PREFIX}{int(index) - lo}.{rest}") if lo <= int(index) < hi else None
        return Piece(name) if plan.rank == 0 else None
    prefix, _, kind = name.rpartition(".")
    layer = prefix.rpartition(".")[2]
    if not name.startswith(LAYER_PREFIX):  # the embedding on every rank; the final norm and head on rank 0
        return Piece(name) if plan.rank == 0 or not name.startswith(HEAD_ONLY) else None
    if layer in COLUMN:
        lo, hi = plan.features(COLUMN[layer])
        return Piece(name, 0, lo, hi)
    if layer in ROW:
        lo, hi = plan.features(ROW[layer])
        if kind == "bias":
            return Piece(name, zero=plan.rank != 0)
        scales = shapes.get(f"{prefix}.scales")
        if scales is None or group_size is None:  # a dense weight
            return Piece(name, 1, lo, hi)
        if kind in ("scales", "biases"):
            return Piece(name, 1, lo // group_size, hi // group_size)
        per_column = shapes[name][-1] / (scales[-1] * group_size)  # packed words per input column
        return Piece(name, 1, int(lo * per_column), int(hi * per_column))
    return Piece(name)
