"""`stratlm convert`: any source stratlm loads (an HF or mlx-lm folder, a hub id, a GGUF file)
to an mlx-lm-compatible folder (config.json with mlx-lm's `quantization` entry, model.safetensors,
tokenizer files), quantized to 4 or 8 bits (affine, `--group-size`, as mlx-lm's convert does) or
dense in a dtype; or a GGUF file re-quantized to Q4_K_M (llama.cpp's recipe, gguf_write).

Without --quantize and --dtype a quantized source stays as it is (a GGUF's Q4_0/Q4_1/Q4_K as
4-bit, its 8-bit-kept types as 8-bit, groups of 32: exactly the values the GGUF holds)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import attrs
import mlx.core as mx
import mlx.nn as nn

from stratlm.core.errors import ConfigError
from stratlm.core.model import LoadedModel
from stratlm import progress as bars

QUANTIZE_BITS = {"4": 4, "q4": 4, "8": 8, "q8": 8}
GGUF_RECIPES = ("q4_k_m",)
GROUP_SIZES = (32, 64, 128)


@attrs.frozen
class ConvertResult:
    out: Path
    quantization: dict[str, Any] | None  # the config's `quantization` entry (None: dense)
    dtype: str


def say(message: str) -> None:
    """Progress on stderr (the stages of a conversion take seconds to minutes)."""
    print(message, file=sys.stderr, flush=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose a new output path or pass --overwrite")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()


def convert(
    source: str,
    out: str | Path,
    *,
    quantize: str | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = say,
    registry=None,
    progress_bar: bool | None = None,
) -> ConvertResult:
    """`progress` gets the stages as lines (None: nothing); `progress_bar` draws a bar per tensor
    (None: STRATLM_PROGRESS, else only when stderr is a terminal; see stratlm.progress)."""
    from .loading import load_model, parse_dtype, save_model

    progress = progress or (lambda message: None)
    out = Path(out).expanduser()
    if quantize is not None and quantize not in QUANTIZE_BITS and quantize not in GGUF_RECIPES:
        raise ConfigError(f"unknown --quantize {quantize!r}; choose 4 (q4), 8 (q8) or q4_k_m (GGUF output)")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")
    if out.suffix == ".gguf" or quantize in GGUF_RECIPES:
        return _to_gguf(source, out, quantize, dtype, overwrite, progress, registry, progress_bar)
    out_dtype = parse_dtype(dtype) if dtype else None
    _check_out(out, overwrite)
    if quantize is None and out_dtype is None:
        progress(f"loading {source} (kept as it is)")
        loaded = load_model(source, dtype="float32", quantized="keep", registry=registry)
        evaluate_tensors(loaded, "reading", progress_bar)
    else:
        progress(f"loading {source} (expanded to float32)")
        loaded = load_model(source, dtype="float32", quantized="dequantize", registry=registry)
        target = out_dtype or source_dtype(loaded)
        if quantize is not None:
            bits = QUANTIZE_BITS[quantize]
            progress(f"quantizing to {bits} bits, groups of {group_size}")
            loaded = quantize_model(loaded, bits, group_size, target, progress_bar=progress_bar)
        else:
            progress(f"casting to {target}")
            loaded.model.set_dtype(target)
            evaluate_tensors(loaded, "casting", progress_bar)
    progress(f"writing {out}")
    save_model(loaded, out)
    q = loaded.model.config.get("quantization")
    float_dtype = next((str(v.dtype) for k, v in _flat(loaded.model) if k.endswith("norm.weight")), "float32")
    progress(f"done: {out}" + (f" ({q['bits']}-bit, groups of {q['group_size']})" if q else f" (dense {float_dtype})"))
    return ConvertResult(out=out, quantization=q, dtype=float_dtype.replace("mlx.core.", ""))


def _flat(model) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def source_dtype(loaded: LoadedModel) -> mx.Dtype:
    """The dtype the checkpoint declares (HF `torch_dtype` / `dtype`), else float16 (mlx-lm's default)."""
    config = loaded.model.config
    declared = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return {"bfloat16": mx.bfloat16, "float32": mx.float32}.get(declared, mx.float16)


def evaluate_tensors(loaded: LoadedModel, desc: str, progress_bar: bool | None) -> None:
    """Compute the model's (lazy) tensors one at a time under a bar, instead of all at once inside the write."""
    for _, value in bars.track(_flat(loaded.model), desc=desc, unit="tensor", progress_bar=progress_bar):
        mx.eval(value)


def quantize_model(loaded: LoadedModel, bits: int, group_size: int, dtype: mx.Dtype, progress_bar: bool | None = None) -> LoadedModel:
    """mlx-lm's quantization: every Linear and Embedding whose input width is a multiple of the
    group size becomes affine `bits`-bit; other weights (norms) are cast to `dtype`."""
    model = loaded.model
    model.set_dtype(dtype)

    def quantizable(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quantizable)
    evaluate_tensors(loaded, "quantizing", progress_bar)
    entry = {"group_size": group_size, "bits": bits}
    model.config = {**model.config, "quantization": entry, "quantization_config": dict(entry)}
    return loaded


def _to_gguf(source: str, out: Path, quantize: str | None, dtype: str | None, overwrite: bool, progress: Callable[[str], None], registry,
             progress_bar: bool | None) -> ConvertResult:
    from stratlm.core.registry import get_registry

    from .gguf_write import requantize_gguf
    from .loading import resolve

    if out.suffix != ".gguf":
        raise ConfigError(f"--quantize {quantize} writes a GGUF file: give an output path ending in .gguf, not {out}")
    if quantize not in GGUF_RECIPES:
        raise ConfigError(f"a .gguf output is written with --quantize {' or '.join(GGUF_RECIPES)}; for --quantize 4/8 give a folder")
    if dtype is not None:
        raise ConfigError("--dtype applies to folder outputs; a Q4_K_M GGUF keeps its norms in float32")
    _, location = resolve(source, registry or get_registry())  # an alias may stand for the embedded GGUF
    if Path(str(location)).suffix != ".gguf":
        raise ConfigError(f"GGUF output is written from a GGUF source (re-quantized); {source} is not a .gguf file. "
                          "Convert it to a folder instead (--quantize 4 or 8)")
    _check_out(out, overwrite)

    drawn = bars.enabled(progress_bar)
    bar = None

    def tick(done: int, total: int) -> None:
        nonlocal bar
        if drawn:  # the bar replaces the every-10% lines
            bar = bar if bar is not None else bars.bar(total, "re-quantizing", unit="tensor", progress_bar=True)
            bar.update(done - bar.n)
        elif done == total or done % max(1, total // 10) == 0:
            progress(f"quantizing tensors: {done}/{total}")

    progress(f"re-quantizing {location} to {quantize.upper()}")
    try:
        requantize_gguf(Path(str(location)), out, quantize, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    progress(f"done: {out}")
    return ConvertResult(out=out, quantization={"gguf": quantize.upper()}, dtype="float32")
