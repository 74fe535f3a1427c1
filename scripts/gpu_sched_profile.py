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


def forward_steps(loaded, padded: bool, grow: bool, fused: bool) -> tuple[float, float]:
    """Median (build ms, eval ms) of a decode step at ROWS rows over a PROMPT-token cache, through
    the installed fused decoder or the reference forward."""
    import mlx.core as mx

    from stratlm.core.model import Model
    from stratlm.decoding import batch_cache

    model = loaded.model
    forward = model if fused else lambda tokens, cache: Model.__call__(model, tokens, cache)
    cache = model.make_cache()
    tokens = mx.random.randint(0, 1000, (ROWS, PROMPT)).astype(mx.int32)
    mx.eval(forward(tokens, cache))
    if padded:  # as a joined batch: rows of different prompt lengths, left-padded
        for c in cache:
            batch_cache.set_padding(c, [i % 17 for i in range(ROWS)])
    step = mx.zeros((ROWS, 1), dtype=mx.int32)
    builds, evals = [], []
    for i in range(STEPS + 3):
        t0 = time.perf_counter()
        logits = forward(step, cache)
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


def model_and_work():
    """The Qwen3-0.6B-shaped model with the device policy applied (on CUDA the fused decoder is
    installed), and ROWS requests at once."""
    from stratlm import Engine
    from stratlm.bench import load as load_bench
    from stratlm.bench.models import bench_model, prompt_tokens

    loaded = bench_model("qwen3-0.6b-random", "bfloat16")
    Engine(loaded).close()
    config = load_bench.LoadConfig(requests=ROWS, rate=0.0, prompt_tokens=PROMPT, max_tokens=64)
    return loaded, load_bench.make_workload(loaded, config, lambda n: prompt_tokens(loaded, n))


def report(label: str, result) -> None:
    row = result.row()
    print(f"{label:<44} {row['tok_per_s']:8.0f} tok/s, ITL p50 {row['itl_p50_ms']:.1f} ms, "
          f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, wall {row['wall_s']:.1f} s", flush=True)


def fused_agreement(loaded, steps: int = 8) -> tuple[float, float]:
    """Left-padded ROWS rows, prompt then decode steps: the fused forward against the reference,
    (largest logit difference at decode steps, share of rows whose argmax agrees)."""
    import mlx.core as mx

    from stratlm.core.model import Model

    model = loaded.model
    padding = [i % 17 for i in range(ROWS)]
    plain, fast = model.make_cache(padding), model.make_cache(padding)
    tokens = mx.random.randint(0, 1000, (ROWS, PROMPT)).astype(mx.int32)
    expected, got = Model.__call__(model, tokens, plain), model(tokens, fast)
    worst, agree = 0.0, []
    step = mx.argmax(expected[:, -1:], axis=-1)
    for _ in range(steps):
        expected, got = Model.__call__(model, step, plain), model(step, fast)
        worst = max(worst, float(mx.abs(expected.astype(mx.float32) - got.astype(mx.float32)).max()))
        agree.append(float(mx.mean(mx.argmax(expected, -1) == mx.argmax(got, -1))))
        step = mx.argmax(expected[:, -1:], axis=-1)
    return worst, sum(agree) / len(agree)


def one_variant(name: str) -> None:
    import mlx.core as mx

    from stratlm.bench import load as load_bench
    from stratlm.bench.models import model_folder

    print(f"--- variant {name}: {VARIANTS[name] or 'MLX defaults'}; mlx {mx.__version__} {mx.default_device()}", flush=True)
    loaded, work = model_and_work()
    worst, agree = fused_agreement(loaded)
    print(f"fused vs reference, {ROWS} left-padded rows, bf16: max |logit diff| {worst:.4f}, argmax agreement {agree:.3f}", flush=True)
    for fused in (False, True):
        for padded in (False, True):
            for grow in (True, False):
                build, run = forward_steps(loaded, padded, grow, fused)
                print(f"{'fused' if fused else 'reference'} forward {ROWS} rows, {'left-padded' if padded else 'no padding':<11} "
                      f"cache {'growing' if grow else 'same length'}: build {build:.2f} ms, eval {run:.2f} ms", flush=True)
    report("stratlm scheduler, fused decoder", load_bench.run_stratlm(loaded, work, ROWS))
    report("stratlm scheduler, reference forward", without_fused_decoder(lambda: load_bench.run_stratlm(loaded, work, ROWS)))
    report("mlx-lm BatchGenerator", load_bench.run_mlx_lm(str(model_folder(loaded)), work, ROWS))


def without_fused_decoder(run):
    """run() with the fused decoder declining every call (the reference forward runs)."""
    from stratlm.backends.cuda import decoder

    call = decoder.FusedDecoder.__call__
    decoder.FusedDecoder.__call__ = lambda self, model, tokens, cache: None
    try:
        return run()
    finally:
        decoder.FusedDecoder.__call__ = call


def with_loop_profiled(run):
    """run() with the scheduler loop's thread under cProfile: (its result, the loop's pstats.Stats)."""
    import cProfile
    import pstats

    from stratlm.decoding import scheduler as sched

    profiles = []
    run_loop = sched.Scheduler._run

    def profiled_loop(self):
        profile = cProfile.Profile()
        profile.enable()
        try:
            run_loop(self)
        finally:
            profile.disable()
            profiles.append(profile)

    sched.Scheduler._run = profiled_loop
    try:
        result = run()
    finally:
        sched.Scheduler._run = run_loop
    return result, pstats.Stats(profiles[0])


def diagnose() -> None:
    """One process, the scheduler on the same 64 requests: the fused decoder in the cold process
    under cProfile (the loop's thread), then warm (after a short unmeasured pass of each), fused,
    the reference forward and mlx-lm's BatchGenerator alternating twice."""
    import mlx.core as mx

    from stratlm.bench import load as load_bench
    from stratlm.bench.models import model_folder

    print(f"--- diagnose; mlx {mx.__version__} {mx.default_device()}", flush=True)
    loaded, work = model_and_work()
    result, stats = with_loop_profiled(lambda: load_bench.run_stratlm(loaded, work, ROWS))
    report("fused, cold process, loop under cProfile", result)
    folder = str(model_folder(loaded))
    warm = load_bench.warmup_workload(work, ROWS)
    load_bench.run_mlx_lm(folder, warm, ROWS)
    without_fused_decoder(lambda: load_bench.run_stratlm(loaded, warm, ROWS))
    for _ in range(2):  # warm, alternating
        report("fused (warm)", load_bench.run_stratlm(loaded, work, ROWS))
        report("reference forward (warm)", without_fused_decoder(lambda: load_bench.run_stratlm(loaded, work, ROWS)))
        report("mlx-lm BatchGenerator (warm)", load_bench.run_mlx_lm(folder, work, ROWS))
    stats.sort_stats("cumulative").print_stats(12)


def profile_warm() -> None:
    """Where the warm scheduler's host time goes at ROWS rows: the same requests once unmeasured,
    once timed, once with the loop's thread under cProfile (its own time, then cumulative)."""
    from stratlm.bench import load as load_bench

    loaded, work = model_and_work()
    load_bench.run_stratlm(loaded, load_bench.warmup_workload(work, ROWS), ROWS)
    report("fused (warm)", load_bench.run_stratlm(loaded, work, ROWS))
    result, stats = with_loop_profiled(lambda: load_bench.run_stratlm(loaded, work, ROWS))
    report("fused (warm), loop under cProfile", result)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=list(VARIANTS))
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--profile-warm", action="store_true")
    args = parser.parse_args()
    if args.diagnose:
        diagnose()
        return 0
    if args.profile_warm:
        profile_warm()
        return 0
    if args.variant:
        one_variant(args.variant)
        return 0
    for name, env in VARIANTS.items():
        subprocess.run([sys.executable, __file__, "--variant", name], env={**os.environ, **env}, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
