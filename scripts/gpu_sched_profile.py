"""Where the scheduler's decode step goes on CUDA at many rows (issue 14): the model's cached
forward at 64 rows with and without left padding (the scheduler's joined batch is left-padded,
so its attention takes a mask), with the cache growing a position a step or held at one length,
then the scheduler and mlx-lm's BatchGenerator on the same 64 requests. Each variant of MLX's
CUDA settings runs in its own process (MLX reads them once).

    GPU_SCRIPT=scripts/gpu_sched_profile.py bash scripts/gpu_bench.sh
    python3 scripts/gpu_sched_profile.py --variant default   # one process, one variant
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "default": {},
    "no-cudnn-sdpa": {"MLX_CUDA_USE_CUDNN_SDPA": "0"},
    "no-cuda-graphs": {"MLX_USE_CUDA_GRAPHS": "0"},
}
ROWS, PROMPT, STEPS = 64, 128, 24


def forward_steps(loaded, padded: bool, grow: bool) -> tuple[float, float]:
    """Median (build ms, eval ms) of a decode step at ROWS rows over a PROMPT-token cache."""
    import mlx.core as mx

    from stratlm.decoding import batch_cache

    model = loaded.model
    cache = model.make_cache()
    tokens = mx.random.randint(0, 1000, (ROWS, PROMPT)).astype(mx.int32)
    mx.eval(model(tokens, cache))
    if padded:  # as a joined batch: rows of different prompt lengths, left-padded
        for c in cache:
            batch_cache.set_padding(c, [i % 17 for i in range(ROWS)])
    step = mx.zeros((ROWS, 1), dtype=mx.int32)
    builds, evals = [], []
    for i in range(STEPS + 3):
        t0 = time.perf_counter()
        logits = model(step, cache)
        t1 = time.perf_counter()
        mx.eval(logits)
        t2 = time.perf_counter()
        if not grow:
            for c in cache:
                c.trim(1)
        if i >= 3:
            builds.append(1e3 * (t1 - t0))
            evals.append(1e3 * (t2 - t1))
    return statistics.median(builds), statistics.median(evals)


def one_variant(name: str) -> None:
    import mlx.core as mx

    from stratlm import Engine
    from stratlm.bench import load as load_bench
    from stratlm.bench.models import bench_model, model_folder, prompt_tokens

    print(f"--- variant {name}: {VARIANTS[name] or 'MLX defaults'}; mlx {mx.__version__} {mx.default_device()}", flush=True)
    loaded = bench_model("qwen3-0.6b-random", "bfloat16")
    Engine(loaded).close()  # the device policy: on CUDA the fused decoder is installed now
    for padded in (False, True):
        for grow in (True, False):
            build, run = forward_steps(loaded, padded, grow)
            print(f"forward {ROWS} rows, {'left-padded (mask)' if padded else 'no padding':<19} cache {'growing' if grow else 'same length'}: "
                  f"build {build:.2f} ms, eval {run:.2f} ms", flush=True)
    config = load_bench.LoadConfig(requests=ROWS, rate=0.0, prompt_tokens=PROMPT, max_tokens=64)
    work = load_bench.make_workload(loaded, config, lambda n: prompt_tokens(loaded, n))
    for run in (lambda: load_bench.run_stratlm(loaded, work, ROWS), lambda: load_bench.run_mlx_lm(str(model_folder(loaded)), work, ROWS)):
        result = run().row()
        print(f"{result['engine']:<24} {result['tok_per_s']:8.0f} tok/s, ITL p50 {result['itl_p50_ms']:.1f} ms, TTFT p50 {result['ttft_p50_ms']:.0f} ms", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=list(VARIANTS))
    args = parser.parse_args()
    if args.variant:
        one_variant(args.variant)
        return 0
    for name, env in VARIANTS.items():
        subprocess.run([sys.executable, __file__, "--variant", name], env={**os.environ, **env}, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
