"""Tensor / pipeline parallelism on GPUs (issue 19): random bf16 weights of real model shapes, one
GPU against several, greedy tokens compared.

Every rank makes the same random tensors (seeded by name), cut to its own part, so the split model
equals the whole one. Run the whole model on one GPU, then split over two, then compare:

    python3 scripts/gpu_tp_bench.py --shape qwen3-32b --out tp1.json
    NCCL_NVLS_ENABLE=0 mlx.launch --backend nccl -n 2 -- python3 scripts/gpu_tp_bench.py --shape qwen3-32b --parallel tensor --out tp2.json
    python3 scripts/gpu_tp_bench.py --compare tp1.json tp2.json

Measured (rank 0 writes the JSON): time to first token for a --prompt-token prompt at batch 1,
decode tokens/s at each --batch (greedy, the cache of a --context-token prompt), peak memory of
every rank, and row 0's greedy tokens at batch 1. CPU dry run: --shape tiny (mlx.launch -n 2 uses
the ring backend on the CPU).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stratlm  # noqa: F401,E402  (the optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from stratlm.core.registry import get_registry  # noqa: E402
from stratlm.decoding.loop import decode_forward, prefill  # noqa: E402
from stratlm.distributed import init_group, make_plan, split_model  # noqa: E402
from stratlm.distributed.plan import piece  # noqa: E402
from stratlm.distributed.loading import slice_array  # noqa: E402
from stratlm.loaders.loading import family_for  # noqa: E402

SHAPES = {
    "tiny": dict(model_type="qwen3", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, vocab_size=512),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-32b": dict(model_type="qwen3", hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      intermediate_size=25600, vocab_size=151936),
    "llama-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      intermediate_size=28672, vocab_size=128256, rope_theta=500000.0),
}


def config_of(shape: str) -> dict:
    return {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False, **SHAPES[shape]}


def random_weights(config: dict, family, plan, dtype: mx.Dtype) -> dict[str, mx.array]:
    """This rank's pieces of a random model: each whole tensor drawn from a key made from its name
    (the same on every rank), then cut; one tensor at a time, so the peak is one whole tensor."""
    full = family.build(config)  # lazy: its own random init is never evaluated
    shapes = {name: tuple(w.shape) for name, w in tree_flatten(full.parameters())}
    del full
    out = {}
    for name, shape in shapes.items():
        part = piece(plan, name, shapes, None)
        if part is None:
            continue
        if "norm" in name:
            whole = mx.ones(shape, dtype)
        else:
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            std = 1.0 if "embed" in name else shape[-1] ** -0.5  # unit-scale activations; peaked logits (fewer near-ties)
            whole = (mx.random.normal(shape, key=mx.random.key(seed)) * std).astype(dtype)
        out[part.name] = slice_array(whole, part)
        mx.eval(out[part.name])
        del whole
    return out


def greedy(model, prompt: mx.array, steps: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s, row 0's tokens) for a batch of prompts (B, L)."""
    mx.synchronize()
    start = time.perf_counter()
    cache, step = decode_forward(model, prompt.shape[1])
    token = mx.argmax(prefill(model, prompt, cache), axis=-1)
    mx.eval(token)
    first = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(step(token[:, None]), axis=-1)
        mx.async_eval(token)
        tokens.append(token)
    mx.eval(tokens)
    decode = (time.perf_counter() - start)
    return first, prompt.shape[0] * steps / decode, [int(t[0].item()) for t in tokens]


def peak_file(args: argparse.Namespace, rank: int) -> Path:
    return Path(f"{args.out or 'gpu_tp_bench'}.rank{rank}.peak")


def compare(a: str, b: str) -> None:
    ra, rb = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    ta, tb = ra["tokens"], rb["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    print(f"{a}: {ra['processes']} x {ra['parallel']}; {b}: {rb['processes']} x {rb['parallel']}")
    print(f"greedy tokens: first {same} of {min(len(ta), len(tb))} identical" + ("" if same == min(len(ta), len(tb)) else f" (then {ta[same]} vs {tb[same]})"))
    for key in ("batches",):
        for batch, x in ra[key].items():
            y = rb[key].get(batch)
            if y:
                print(f"batch {batch}: decode {x['decode_tps']:.1f} vs {y['decode_tps']:.1f} tok/s ({y['decode_tps'] / x['decode_tps']:.2f}x)")
    print(f"time to first token ({ra['prompt_tokens']} tokens): {ra['ttft_s']:.3f} vs {rb['ttft_s']:.3f} s")
    print(f"peak memory per rank GB: {ra['peak_gb']} vs {rb['peak_gb']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--parallel", choices=("tensor", "pipeline"), default="tensor", help="how to split when launched over several processes")
    ap.add_argument("--batch", default="1,64", help="comma-separated batch sizes to decode")
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="prompt length for the time to first token (batch 1)")
    ap.add_argument("--context", type=int, default=64, help="prompt length before each decode measurement")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per measurement")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default=os.environ.get("STRATLM_DIST_BACKEND", "any"))
    ap.add_argument("--out", default=None, help="JSON results (rank 0)")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    dtype = getattr(mx, args.dtype)
    config = config_of(args.shape)
    family = family_for(config, get_registry())
    group = init_group(args.backend)
    rank, size = group.rank(), group.size()
    plan = make_plan(args.parallel, config, rank, size)
    if rank:
        peak_file(args, rank).unlink(missing_ok=True)
        atexit.register(lambda: peak_file(args, rank).write_text(f"{mx.get_peak_memory() / 1e9:.3f}"))
    weights = random_weights(config, family, plan, dtype)
    if size == 1:  # the whole model, as the Engine runs it on one device
        from stratlm.distributed.loading import build_shard

        model = build_shard(plan, config, weights, family, dtype=dtype, group_size=None, keep_quantized=False, where=args.shape)
        if mx.default_device() == mx.gpu:
            from stratlm.backends.cuda.decoder import install

            install(model)  # the fused layout and decode path
    else:
        loaded = split_model(plan, config, weights, family, group, dtype=dtype, keep_quantized=False, where=args.shape)
        model = loaded.model  # ranks past 0 served rank 0 and exited inside split_model
    weights = None
    vocab = int(config["vocab_size"])
    ids = mx.random.randint(0, vocab, (1, args.prompt_tokens), key=mx.random.key(7)).astype(mx.int32)
    greedy(model, ids[:, :16], 2)  # warm-up (kernels, traces)
    ttft, _, _ = greedy(model, ids, 1)
    results = {"shape": args.shape, "processes": size, "parallel": args.parallel if size > 1 else "whole", "device": str(mx.default_device()),
               "prompt_tokens": args.prompt_tokens, "ttft_s": ttft, "batches": {}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for batch in [int(b) for b in args.batch.split(",")]:
        prompt = mx.random.randint(0, vocab, (batch, args.context), key=mx.random.key(11)).astype(mx.int32)
        _, tps, tokens = greedy(model, prompt, args.steps)
        results["batches"][str(batch)] = {"decode_tps": tps}
        if batch == 1:
            results["tokens"] = tokens
        print(f"batch {batch}: {tps:.1f} tok/s", flush=True)
    peaks = [round(mx.get_peak_memory() / 1e9, 3)]
    if size > 1:  # the other ranks write theirs as they exit (see peak_file)
        model.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(peak_file(args, r).exists() for r in range(1, size)):
            time.sleep(0.2)
        peaks += [float(peak_file(args, r).read_text()) if peak_file(args, r).exists() else None for r in range(1, size)]
    results["peak_gb"] = peaks
    print(json.dumps({k: v for k, v in results.items() if k != "tokens"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
