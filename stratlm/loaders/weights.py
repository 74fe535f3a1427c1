"""Checkpoint tensors into a family's model: quantized triples kept as quantized layers or
expanded to dense weights, dtypes applied, the family's names checked strictly."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from stratlm.core.errors import ModelLoadError
from stratlm.core.model import Model, ModelFamily
from stratlm.device import cpu_active


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
        prefixes = {k[: -len(".scales")]: v for k, v in weights.items() if k.endswith(".scales")}
        layer_bits = {prefix: bits_of(weights[prefix + ".weight"], scales, group_size) for prefix, scales in prefixes.items()}
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
