"""The fused-projection layout: an inference-time arrangement of the q/k/v and gate/up weights
that keeps the Hugging Face names. `DecoderLM.optimize_for_inference` puts a model in it; the
reference block's projections (`project`) then take one matmul each, and the CUDA backend's
fused decode path (backends/cuda/decoder.py) reads the stacked matrices."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def fuse_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Stack these bias-free Linear layers' weights into one matrix and make each layer's weight
    a row slice (a view) of it: one matmul then computes all of them, no memory is duplicated,
    and parameter names, adapters and what save_model writes stay as they were. Layers that were
    replaced (wrapped, quantized, biased) are left alone."""
    layers = [getattr(module, n) for n in names]
    if not all(type(layer) is nn.Linear and "bias" not in layer for layer in layers):
        return
    fused = mx.concatenate([layer.weight for layer in layers], axis=0)
    mx.eval(fused)
    views, start = [], 0
    for layer in layers:
        rows = layer.weight.shape[0]
        views.append(fused[start : start + rows])
        start += rows
    fused_t = fused.T
    mx.eval(views, fused_t)
    for layer, view in zip(layers, views):
        layer.weight = view
    # "_": not a parameter. fused_t is an evaluated view: `x @ fused_t` is one graph node;
    # the split points cut its output back into the layers' outputs
    splits = tuple(int(sum(v.shape[0] for v in views[: i + 1])) for i in range(len(views) - 1))
    module._fused = (fused_t, tuple(views), splits, fused)


def fused_intact(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether the named layers are still the plain Linears whose weights are the fused views
    (training, set_dtype, adapters and transforms replace them)."""
    views = module["_fused"][1]
    for name, view in zip(names, views):
        layer = module.get(name)
        if type(layer) is not nn.Linear or layer.get("weight") is not view:
            return False
    return True


def project(module: nn.Module, x: mx.array, names: tuple[str, ...]) -> list[mx.array]:
    """The named projections of x: one matmul while the fused layout is intact, else one each."""
    fused = module.get("_fused")
    if fused is not None:
        weight_t, _, splits, _ = fused
        if fused_intact(module, names):
            return mx.split(x @ weight_t, list(splits), axis=-1)
        module.pop("_fused")  # a weight was replaced (training, set_dtype, a transform): drop the stale copy
    return [getattr(module, n)(x) for n in names]

