"""Where a decode step's time goes at many rows (issue 14): the scheduler and the static batch on
the same requests, all at once, with every queued graph synchronized, so each step splits into
  queue:  the host queuing the graph (mx.async_eval with nothing in flight),
  device: the wait for it to finish after that (mx.synchronize),
  host:   the rest of the loop's wall time a step (building the graph, reading, bookkeeping).
Synchronized steps are slower than pipelined ones; the split says which side a step waits on.
Then each again as it runs (pipelined), for its speed. Run through scripts/gpu_bench.sh:
    GPU_SCRIPT="scripts/gpu_step_split.py 64 256" bash scripts/gpu_bench.sh
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import mlx.core as mx

from stratlm import Engine
from stratlm.bench import load as load_bench
from stratlm.bench.models import bench_model, prompt_tokens


class Split:
    """Stands in for mx.async_eval: each call synchronized before and after, timed."""

    def __init__(self):
        self.queue: list[float] = []
        self.device: list[float] = []
        self.real = mx.async_eval

    def __call__(self, *args, **kwargs):
        mx.synchronize()
        t0 = time.perf_counter()
        self.real(*args, **kwargs)
        t1 = time.perf_counter()
        mx.synchronize()
        self.queue.append(t1 - t0)
        self.device.append(time.perf_counter() - t1)


def split(label: str, run) -> None:
    timer = Split()
    mx.async_eval = timer
    try:
        start = time.perf_counter()
        result = run()
        wall = time.perf_counter() - start
    finally:
        mx.async_eval = timer.real
    steps = len(timer.queue)
    queue, device = 1e3 * statistics.median(timer.queue), 1e3 * statistics.median(timer.device)
    host = 1e3 * (wall - sum(timer.queue) - sum(timer.device)) / max(1, steps)
    print(f"{label:<40} {steps:5d} queued graphs: queue p50 {queue:6.2f} ms, device p50 {device:6.2f} ms, "
          f"host rest {host:6.2f} ms a graph; {result.throughput:8.0f} tok/s synchronized", flush=True)


def report(label: str, result) -> None:
    row = result.row()
    print(f"{label:<40} {row['tok_per_s']:8.0f} tok/s, ITL p50 {row['itl_p50_ms']:.1f} ms, wall {row['wall_s']:.2f} s", flush=True)


def main() -> int:
    loaded = bench_model(os.environ.get("STEP_SPLIT_MODEL", "qwen3-0.6b-random"), "bfloat16")
    Engine(loaded).close()  # the device policy: the fused decoder on CUDA
    print(f"mlx {mx.__version__} {mx.default_device()}", flush=True)
    for rows in [int(a) for a in sys.argv[1:]] or [64]:
        config = load_bench.LoadConfig(requests=rows, rate=0.0, prompt_tokens=128, max_tokens=64)
        work = load_bench.make_workload(loaded, config, lambda n: prompt_tokens(loaded, n))
        warm = load_bench.warmup_workload(work, rows)
        scheduler = lambda w=work, n=rows: load_bench.run_stratlm(loaded, w, n, "results")  # noqa: E731
        static = lambda w=work: load_bench.run_static(loaded, w)  # noqa: E731
        scheduler(warm)
        static(warm)
        print(f"--- {rows} requests at once, prompts ~128, outputs ~64", flush=True)
        for _ in range(2):
            report("scheduler", scheduler())
            report("static batch", static())
        split("scheduler, synchronized", scheduler)
        split("static batch, synchronized", static)
    return 0


if __name__ == "__main__":
    sys.exit(main())
