"""stratlm convert: a model (folder, hub id, GGUF, alias) to an mlx-lm-compatible folder,
quantized (4/8-bit) or dense, or a GGUF re-quantized to Q4_K_M."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a model to an mlx-lm folder (quantized or dense) or a GGUF to Q4_K_M",
                       description="SOURCE: a model folder, hub id, .gguf file or alias. OUT: a folder (config.json, "
                                   "model.safetensors, tokenizer; mlx-lm and stratlm load it) or, with --quantize q4_k_m "
                                   "and a GGUF source, a .gguf file.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out", metavar="OUT", nargs="?", help="output folder or .gguf file (or --out)")
    p.add_argument("--out", dest="out_option", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quantize", metavar="{4,8,q4,q8,q4_k_m}", help="4 or 8: affine MLX quantization (mlx-lm's); q4_k_m: a GGUF re-quantized by llama.cpp's recipe")
    p.add_argument("--group-size", type=int, default=64, help="values per quantization group: 32, 64 (default) or 128")
    p.add_argument("--dtype", help="float16, bfloat16 or float32: the dense weights (and scales) of the output")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    from stratlm.core.errors import ConfigError
    from stratlm.loaders.convert import convert

    out = args.out or args.out_option
    if out is None:
        raise ConfigError("convert needs an output: stratlm convert SOURCE OUT")
    if args.out and args.out_option and args.out != args.out_option:
        raise ConfigError(f"two outputs given: {args.out} and --out {args.out_option}")
    result = convert(args.source, out, quantize=args.quantize, group_size=args.group_size, dtype=args.dtype,
                     overwrite=args.overwrite, registry=args.registry)
    print(result.out)
    return 0
