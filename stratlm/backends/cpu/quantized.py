"""Quantized layers whose products run stratlm's CPU kernels (`stratlm.backends.cpu.kernels`).

MLX's own quantized matmul is slow on the CPU, so a quantized checkpoint (the embedded
GGUF) used to be expanded to dense fp32 there. The kernels read the packed 4/8-bit weights
directly (5-6x fewer bytes a token than fp32). The layers keep nn.QuantizedLinear's and
nn.QuantizedEmbedding's parameters, names and values, so saving, adapters and mlx-lm see
no difference; off the CPU, or for inputs the kernels do not take, they are MLX's layers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from stratlm.backends.cpu import kernels
from stratlm.device import cpu_active


def kernel_takes(x: mx.array) -> bool:
    """fp32, or bf16/fp16 (the kernel sums in fp32 and rounds to x's dtype), on the CPU."""
    return x.dtype in (mx.float32, mx.bfloat16, mx.float16) and cpu_active()


def kernel_scales(layer: nn.Module) -> tuple[mx.array, mx.array]:
    """The scales and biases the kernels read for this layer: fp16 copies when fp16 holds their
    values exactly (a GGUF's are fp16; a 4-bit layer's fp32 scales and biases are a sixth of its
    bytes a token), else its own fp32 ones. The copies are made once for the arrays the layer
    holds (kept beside them, not parameters: saving and adapters see the fp32 ones)."""
    scales, biases = layer["scales"], layer["biases"]
    made = layer.__dict__.get("_kernel_scales")
    if made is None or made[0] is not scales or made[1] is not biases:
        half = scales.astype(mx.float16), biases.astype(mx.float16)
        exact = all(mx.array_equal(h.astype(a.dtype), a).item() for h, a in zip(half, (scales, biases)))
        if exact:
            mx.eval(half)
        made = (scales, biases, half if exact else (scales, biases))
        layer.__dict__["_kernel_scales"] = made  # not setattr: a Module keeps tuples of arrays as parameters
    return made[2]


def kernel_scale_savings(model: nn.Module) -> int:
    """Bytes of scales and biases the kernels read fewer than the model's parameters hold: the
    fp16 copies made so far (kernel_scales) against the fp32 arrays they stand for."""
    saved = 0
    for _, layer in model.named_modules():
        made = layer.__dict__.get("_kernel_scales")
        if made is not None:
            saved += made[0].nbytes + made[1].nbytes - made[2][0].nbytes - made[2][1].nbytes
    return saved


class KernelQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not kernel_takes(x):
            return super().__call__(x)
        y = kernels.quantized_matmul(x, self["weight"], *kernel_scales(self), group_size=self.group_size, bits=self.bits)
        return y + self["bias"] if "bias" in self else y


class KernelQuantizedEmbedding(nn.QuantizedEmbedding):
    #: the model's activation dtype, by name: rows are dequantized with the fp32 scales the kernels
    #: need, then given the dtype the rest of the model computes in (set by use_cpu_kernels).
    #: A name, not an mx.Dtype: transforms deep-copy models, and a Dtype cannot be copied.
    activation_dtype: str = "float32"

    def __call__(self, x: mx.array) -> mx.array:
        rows = super().__call__(x)
        dtype = getattr(mx, self.activation_dtype)
        return rows if rows.dtype == dtype else rows.astype(dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        if not kernel_takes(x):
            return super().as_linear(x)
        return kernels.quantized_matmul(x, self["weight"], *kernel_scales(self), group_size=self.group_size, bits=self.bits)


KERNEL_LAYERS = {nn.QuantizedLinear: KernelQuantizedLinear, nn.QuantizedEmbedding: KernelQuantizedEmbedding}


def supported(layer: nn.Module) -> bool:
    """Affine 4/8-bit weights with fp32 scales and biases, in groups the kernels handle."""
    return (
        getattr(layer, "mode", "affine") == "affine"
        and layer.bits in kernels.BITS
        and layer.group_size in kernels.GROUP_SIZES
        and layer.get("biases") is not None
        and layer["scales"].dtype == mx.float32
        and layer["biases"].dtype == mx.float32
    )


def adopt(cls: type, layer: nn.Module) -> nn.Module:
    """The same layer as an instance of cls: same parameters and settings, nothing copied."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    dict.update(new, layer)
    return new


def use_cpu_kernels(model: nn.Module, dtype: mx.Dtype = mx.float32) -> int:
    """On the CPU, make the model's quantized layers that the kernels support run on them;
    returns how many (none on another device). dtype: the model's activation dtype (the
    quantized embedding's lookups are given it)."""
    if not cpu_active() or not kernels.available():
        return 0
    swaps = [(path, adopt(KERNEL_LAYERS[type(layer)], layer)) for path, layer in model.named_modules() if type(layer) in KERNEL_LAYERS and supported(layer)]
    for _, layer in swaps:
        if isinstance(layer, KernelQuantizedEmbedding):
            layer.activation_dtype = str(dtype).rpartition(".")[2]  # "mlx.core.bfloat16" -> "bfloat16"
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
