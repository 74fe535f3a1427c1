"""collapse: make a model shallower.

Modes, for a run of n consecutive blocks [start, start + n):
  drop   remove the run
  merge  replace the run by one block whose weights are the run's average
  tie    run one block (the run's average) n times in its place: the same depth and
         KV cache, 1/n of the run's parameters
The run is given (`start`, or `layers="a:b"`) or chosen by measurement: the run whose input
and output hidden states on calibration text have the smallest angular distance
arccos(cos(h_start, h_start+n)) / pi (Gromov et al. 2024), averaged over token positions.
The first and last block are never chosen by measurement (they are the most distinct).

The result is a new model (a deep copy; the original keeps its blocks) whose config has the
new `num_hidden_layers`, so the saved folder reloads. `collapse_report` gives parameters,
blocks, KV-cache bytes per token and per-token compute before and after.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from stratlm.core.errors import ConfigError
from stratlm.core.model import LoadedModel
from stratlm.core.log import get_logger
from stratlm.core.model import Model

from .texts import CALIBRATION_TEXTS

log = get_logger(__name__)

MODES = ("drop", "merge", "tie")


@attrs.frozen
class Origin:
    """What collapse did, kept on the new model for heal: the teacher and the block map."""

    teacher: LoadedModel
    start: int  # first block of the run (in the teacher)
    n: int  # blocks in the run
    mode: str
    distance: float | None  # angular distance of the chosen run, when measured
    # student block index -> the teacher block whose output it should reproduce
    block_map: tuple[int, ...] = attrs.field(converter=tuple)

    def __deepcopy__(self, memo: dict) -> "Origin":
        return self  # copies of the student share the teacher; it is never modified


def origin_of(model: Model) -> Origin | None:
    return getattr(model, "collapse_origin", None)


# -- measuring -------------------------------------------------------------------------------------
def angular_distance(a: mx.array, b: mx.array) -> mx.array:
    """arccos(cosine similarity) / pi per position, in [0, 1]. a, b: (..., D)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    cos = (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1) + 1e-12)
    return mx.arccos(mx.clip(cos, -1.0, 1.0)) / math.pi


def calibration_tokens(loaded: LoadedModel, texts: Sequence[str] | None = None, max_tokens: int = 256) -> list[mx.array]:
    texts = CALIBRATION_TEXTS if texts is None else texts
    if not texts:
        raise ConfigError("calibration needs at least one text")
    return [mx.array([loaded.tokenizer.encode(t)[:max_tokens]]) for t in texts]


def run_distances(loaded: LoadedModel, n: int, texts: Sequence[str] | None = None) -> list[float]:
    """Mean angular distance between the hidden state entering block l and leaving block l+n-1, for every l."""
    model = loaded.model
    depth = len(model.layers)
    totals, count = [0.0] * (depth - n + 1), 0
    for tokens in calibration_tokens(loaded, texts):
        states = model.hidden_states(tokens)
        distances = mx.stack([angular_distance(states[l], states[l + n]).sum() for l in range(depth - n + 1)])
        for l, value in enumerate(distances.tolist()):
            totals[l] += value
        count += tokens.shape[1]
    return [t / count for t in totals]


def choose_run(loaded: LoadedModel, n: int, texts: Sequence[str] | None = None) -> tuple[int, float]:
    """(start, distance) of the run of n blocks that changes the hidden state least (first and last block kept)."""
    depth = len(loaded.model.layers)
    if n > depth - 2:
        raise ConfigError(f"cannot choose {n} blocks to collapse by measurement in a {depth}-block model: the first and last block are kept; "
                          f"use n <= {depth - 2} or give start")
    distances = run_distances(loaded, n, texts)
    candidates = range(1, depth - n)  # runs that keep block 0 and the last block
    start = min(candidates, key=lambda l: distances[l])
    return start, distances[start]


# -- rebuilding --------------------------------------------------------------------------------------
def averaged_block(blocks: Sequence[nn.Module]) -> nn.Module:
    """A copy of the first block whose parameters are the blocks' mean (dense weights only)."""
    if any(isinstance(m, nn.QuantizedLinear) for b in blocks for _, m in b.named_modules()):
        raise ConfigError("merge and tie average weights, which needs dense blocks; load the model dequantized (quantized='dequantize')")
    merged = copy.deepcopy(blocks[0])
    params = [b.parameters() for b in blocks]
    mean = tree_map(lambda *xs: (sum(x.astype(mx.float32) for x in xs) / len(xs)).astype(xs[0].dtype), *params)
    merged.update(mean)
    return merged


def parse_layers(layers: str | Sequence[int]) -> tuple[int, int]:
    """"a:b" (Python slice, end excluded) or (a, b) -> (start, n)."""
    try:
        if isinstance(layers, str):
            a, b = (int(x) for x in layers.split(":"))
        else:
            a, b = (int(x) for x in layers)
    except (TypeError, ValueError):
        raise ConfigError(f"layers must be 'start:end' (end excluded), e.g. '10:14', got {layers!r}") from None
    return a, b - a


def collapse(
    loaded: LoadedModel,
    *,
    mode: str = "drop",
    n: int | None = None,
    start: int | None = None,
    layers: str | Sequence[int] | None = None,
    calibration: Sequence[str] | None = None,
) -> LoadedModel:
    """Transform: a new, shallower model (see the module doc). Default: drop a quarter of the blocks,
    the run chosen by angular distance."""
    if mode not in MODES:
        raise ConfigError(f"collapse mode must be one of {', '.join(MODES)}, got {mode!r}")
    depth = len(loaded.model.layers)
    if layers is not None:
        if start is not None or n is not None:
            raise ConfigError("give either layers='start:end' or start/n, not both")
        start, n = parse_layers(layers)
    if n is None:
        n = max(1, depth // 4)
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"the number of blocks to collapse must be an integer >= 0, got {n!r}")
    distance = None
    if n == 0:
        start = start or 0
    elif start is None:
        start, distance = choose_run(loaded, n, calibration)
    if not 0 <= start or start + n > depth or start >= depth:
        raise ConfigError(f"collapse range {start}:{start + n} is outside the model, which has blocks 0..{depth - 1} (end excluded: at most {depth})")
    if mode == "drop" and n >= depth:
        raise ConfigError(f"dropping {n} blocks would leave none of the model's {depth}")
    model = copy.deepcopy(loaded.model)
    kept = list(model.layers)
    run = kept[start : start + n]
    if mode == "drop" or n == 0:
        middle, middle_map = [], []
    elif mode == "merge":
        middle, middle_map = [averaged_block(run)], [start + n - 1]
    else:  # tie: one module, listed n times; each listing gets its own KV cache
        middle, middle_map = [averaged_block(run)] * n, list(range(start, start + n))
    model.set_layers(kept[:start] + middle + kept[start + n :])
    block_map = list(range(start)) + middle_map + list(range(start + n, depth))
    model.collapse_origin = Origin(teacher=loaded, start=start, n=n, mode=mode, distance=distance, block_map=block_map)
    mx.eval(model.parameters())
    log.debug("collapsed", mode=mode, start=start, n=n, distance=distance, blocks_before=depth, blocks_after=len(model.layers))
    return loaded.replace(model=model, source=f"{loaded.source}+collapse({mode} {start}:{start + n})")


# -- reporting ----------------------------------------------------------------------------------------
@attrs.frozen
class Footprint:
    parameters: int  # distinct parameters (a tied block counts once)
    blocks: int  # blocks run per token
    kv_bytes_per_token: int
    flops_per_token: int  # 2 x the weights multiplied per token (attention over the context not counted)

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


def logical_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied one counted once), a quantized weight as the values it packs:
    the same count for a model and its quantized copy (the quantization's scales and biases are
    not counted)."""
    seen: set[int] = set()
    total = 0
    for _, module in model.named_modules():
        bits = getattr(module, "bits", None) if "scales" in module else None
        for key, value in module.items():
            if not isinstance(value, mx.array) or key.startswith("_") or id(value) in seen:
                continue
            seen.add(id(value))
            if bits is None:
                total += value.size
            elif key == "weight":
                total += value.size * 32 // bits
    return total


def footprint(model: Model) -> Footprint:
    parameters = logical_parameters(model)
    cfg = model.config
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    itemsize = model.layers[0].input_layernorm.weight.dtype.size if hasattr(model.layers[0], "input_layernorm") else 4
    kv = 2 * len(model.layers) * kv_heads * head_dim * itemsize
    per_block = sum(linear_weights(b) for b in model.layers)
    head = cfg["vocab_size"] * cfg["hidden_size"]
    return Footprint(parameters=parameters, blocks=len(model.layers), kv_bytes_per_token=kv, flops_per_token=2 * (per_block + head))


def linear_weights(block: nn.Module) -> int:
    """Multiply-accumulates of one block per token (its linear layers' logical weight count)."""
    total = 0
    for _, m in block.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            out_dims, in_dims = m.weight.shape
            if isinstance(m, nn.QuantizedLinear):
                in_dims = in_dims * 32 // m.bits
            total += out_dims * in_dims
    return total


def collapse_report(before: Model, after: Model) -> dict[str, Any]:
    b, a = footprint(before), footprint(after)
    origin = origin_of(after)
    report = {"before": b.as_dict(), "after": a.as_dict(), "ratio": {k: a.as_dict()[k] / v for k, v in b.as_dict().items() if v}}
    if origin is not None:
        report["run"] = {"mode": origin.mode, "start": origin.start, "end": origin.start + origin.n, "angular_distance": origin.distance}
    return report


def format_report(report: dict[str, Any]) -> str:
    rows = [("parameters", "parameters"), ("blocks", "blocks"), ("KV-cache bytes/token", "kv_bytes_per_token"), ("FLOPs/token", "flops_per_token")]
    lines = []
    if "run" in report:
        run = report["run"]
        dist = f", angular distance {run['angular_distance']:.4f}" if run["angular_distance"] is not None else ""
        lines.append(f"collapse: {run['mode']} blocks {run['start']}:{run['end']}{dist}")
    for label, key in rows:
        lines.append(f"  {label:<22} {report['before'][key]:>14,} -> {report['after'][key]:>14,}  ({report['ratio'].get(key, 1.0):.1%})")
    return "\n".join(lines)
