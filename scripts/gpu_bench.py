"""The GPU benchmark, run by scripts/gpu_bench.sh on the device machine in one call.

1. correctness on a random model of the real Qwen3-0.6B shape: stratlm's greedy tokens equal
   mlx-lm's (fp32), the compiled decode step's logits equal the plain forward's;
2. timings, bf16, prompt 64, 256 new tokens: stratlm vs mlx-lm batch 1 and batch 64 (the
   `batch` strategy vs mlx-lm's batch_generate), the plain forward instead of the compiled step (STRATLM_COMPILE=off), and
   Hugging Face transformers with a static cache and torch.compile;
3. a short table, printed last. Full reports go to $OUT.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import stratlm  # noqa: F401

import mlx.core as mx

from stratlm.bench.engines import MlxLmEngine, StratlmEngine
from stratlm.bench.models import bench_model, model_folder, prompt_tokens
from stratlm.bench.runner import BenchConfig, Worker, first_difference, format_report, interleaved, run_bench
from stratlm.decoding.loop import decode_forward, prefill

from gpu_profile import with_compile  # this script's folder is on sys.path

# overridable for a dry run on the CPU with a small model folder
MODEL = os.environ.get("GPU_BENCH_MODEL", "qwen3-0.6b-random")
OUT = os.environ.get("OUT", "/tmp/gpu_bench_out")
PROMPT, NEW, BATCH = (int(os.environ.get(k, d)) for k, d in (("GPU_BENCH_PROMPT", 64), ("GPU_BENCH_NEW", 256), ("GPU_BENCH_BATCH", 64)))
REPS = int(os.environ.get("GPU_BENCH_REPS", 5))
table: list[tuple[str, str]] = []


def section(name):
    def wrap(fn):
        def run(*args):
            print(f"\n=== {name} ===", flush=True)
            start = time.perf_counter()
            try:
                return fn(*args)
            except Exception:
                traceback.print_exc()
                table.append((name, "FAILED (see log)"))
            finally:
                print(f"({name}: {time.perf_counter() - start:.0f}s)", flush=True)
        return run
    return wrap


@section("correctness fp32")
def correctness():
    loaded = bench_model(MODEL, "float32")
    prompt = prompt_tokens(loaded, 32)
    folder = model_folder(loaded)
    ours = StratlmEngine(loaded).run(prompt, 64).token_ids
    theirs = MlxLmEngine(str(folder)).run(prompt, 64).token_ids
    diff = first_difference(ours, theirs)
    print("stratlm ", ours[:16], "\nmlx-lm  ", theirs[:16], "\nfirst difference:", diff)
    table.append(("fp32 greedy tokens == mlx-lm (64)", "yes" if diff is None else f"NO, differs at {diff}"))
    # compiled step vs plain forward, teacher-forced on the same tokens
    model = loaded.model
    tokens = mx.array([prompt], dtype=mx.int32)
    cache_c, step_c = with_compile("on", lambda: decode_forward(model, len(prompt)))()
    cache_p, step_p = with_compile("off", lambda: decode_forward(model, len(prompt)))()
    os.environ.pop("STRATLM_COMPILE")
    worst = float(mx.abs(prefill(model, tokens, cache_c) - prefill(model, tokens, cache_p)).max())
    for t in ours[:32]:
        x = mx.array([[t]], dtype=mx.int32)
        worst = max(worst, float(mx.abs(step_c(x) - step_p(x)).max()))
    print("max |compiled - plain| logits:", worst)
    table.append(("compiled step vs plain, max logit diff", f"{worst:.2e}"))


@section("bf16 token agreement")
def bf16_agreement(folder, loaded):
    prompt = prompt_tokens(loaded, PROMPT)
    ours = StratlmEngine(loaded).run(prompt, NEW).token_ids
    theirs = MlxLmEngine(str(folder)).run(prompt, NEW).token_ids
    diff = first_difference(ours, theirs)
    table.append((f"bf16 greedy tokens == mlx-lm ({NEW})", "all" if diff is None else f"first {diff}"))


@section("batch 1")
def batch1():
    report = run_bench(BenchConfig(model=MODEL, dtype="bfloat16", prompt_tokens=PROMPT, max_tokens=NEW, reps=REPS, baselines="same-process"), print)
    text = format_report(report)
    print(text)
    open(f"{OUT}/batch1.json", "w").write(report.to_json())
    e = {x.name: x for x in report.engines}
    table.append(("b1 stratlm decode tok/s", str(e["stratlm"].decode_tps)))
    table.append(("b1 mlx-lm decode tok/s", str(e["mlx-lm, same process"].decode_tps)))
    table.append(("b1 ratio stratlm/mlx-lm", f"{report.decode_ratios['mlx-lm, same process']}x"))
    table.append(("b1 prefill stratlm / mlx-lm", f"{e['stratlm'].prefill_tps.median:.0f} / {e['mlx-lm, same process'].prefill_tps.median:.0f}"))
    table.append(("b1 peak GB stratlm / mlx-lm", f"{e['stratlm'].peak_gb:.2f} / {e['mlx-lm, same process'].peak_gb:.2f}"))
    table.append(("b1 bandwidth limit (steps/s)", f"{report.limit_tps:.0f}"))


@section("batch 1 variants, interleaved")
def batch1_variants(folder, loaded):
    """stratlm's default decode step (on CUDA the compiled one) against the plain forward
    (STRATLM_COMPILE=off) and mlx-lm."""
    ours, theirs = StratlmEngine(loaded), MlxLmEngine(str(folder))
    prompt = prompt_tokens(loaded, PROMPT)

    def variant(engine, compiled, tokens):
        return with_compile(compiled, lambda: engine.run(prompt, tokens))

    variants = {"default": (ours, None), "plain forward": (ours, "off"), "mlx-lm": (theirs, None)}
    for engine, compiled in variants.values():  # warm-up
        variant(engine, compiled, 32)()
    results = interleaved({name: variant(engine, compiled, NEW) for name, (engine, compiled) in variants.items()}, REPS)
    os.environ.pop("STRATLM_COMPILE", None)
    speeds = {name: [r.decode_tps for r in runs] for name, runs in results.items()}
    diff = first_difference(results["plain forward"][-1].token_ids, results["default"][-1].token_ids)
    table.append(("b1 plain-forward tokens == default (bf16)", "all" if diff is None else f"first {diff}"))
    for name in variants:
        ratios = [a / b for a, b in zip(speeds[name], speeds["mlx-lm"])]
        print(f"{name:<16} {statistics.median(speeds[name]):8.1f} tok/s ({min(speeds[name]):.0f}-{max(speeds[name]):.0f})  /mlx-lm {statistics.median(ratios):.2f}x")
        if name != "mlx-lm":
            table.append((f"b1 stratlm {name} (interleaved)", f"{statistics.median(speeds[name]):.0f} tok/s, {statistics.median(ratios):.2f}x mlx-lm ({min(ratios):.2f}-{max(ratios):.2f})"))
    table.append(("b1 mlx-lm (interleaved)", f"{statistics.median(speeds['mlx-lm']):.0f} tok/s"))


@section("batch 1 profile: host graph building vs device")
def profile(folder, loaded):
    """Per decode step: Python graph building, encoding, device wait, and a pipelined step, for
    stratlm (ordinary and fused graph) and mlx-lm (scripts/gpu_profile.py measures)."""
    from gpu_profile import profile as profile_engine, steps  # this script's folder is on sys.path

    prompt = mx.array([prompt_tokens(loaded, PROMPT)], dtype=mx.int32)
    for name, make_cache, make_step in steps(folder):
        table.append((f"b1 profile {name}", profile_engine(name, make_step(make_cache()), prompt)))


@section("batch N")
def batch64():
    report = run_bench(BenchConfig(model=MODEL, dtype="bfloat16", batch=BATCH, prompt_tokens=PROMPT, max_tokens=NEW, reps=max(1, REPS - 2), baselines="same-process"), print)
    print(format_report(report))
    open(f"{OUT}/batch64.json", "w").write(report.to_json())
    e = {x.name: x for x in report.engines}
    table.append((f"b{BATCH} stratlm decode tok/s", str(e["stratlm"].decode_tps)))
    table.append((f"b{BATCH} mlx-lm decode tok/s", str(e["mlx-lm, same process"].decode_tps)))
    table.append((f"b{BATCH} ratio stratlm/mlx-lm", f"{report.decode_ratios['mlx-lm, same process']}x"))


@section("transformers + torch.compile, static cache")
def transformers_compiled(folder, loaded):
    """Its own process (its own Python environment) as a benchmark worker: its rounds are
    interleaved with stratlm's in this process, and the ratio taken per round."""
    prompt = prompt_tokens(loaded, PROMPT)
    script = os.path.join(os.path.dirname(__file__), "gpu_bench_hf.py")
    worker = Worker(str(folder), {}, command=[sys.executable, script, str(folder), json.dumps(prompt), str(NEW), "--serve"])

    def stratlm(compiled):
        return with_compile(compiled, lambda: ours.run(prompt, NEW))

    try:
        ours = StratlmEngine(loaded)
        ours.run(prompt, 32)  # warm-up
        stratlm("off")()
        results = interleaved({"stratlm": stratlm(None), "stratlm plain forward": stratlm("off"), "torch": lambda: worker.run(prompt, NEW)}, REPS)
    finally:
        worker.close()
        os.environ.pop("STRATLM_COMPILE", None)
    speeds = {name: [r.decode_tps for r in runs] for name, runs in results.items()}
    for name, values in speeds.items():
        print(f"{name:<22} decode {statistics.median(values):.0f} tok/s ({min(values):.0f}-{max(values):.0f}) rounds: {[round(v) for v in values]}")
    table.append(("b1 transformers+compile decode tok/s", f"{statistics.median(speeds['torch']):.0f} ({min(speeds['torch']):.0f}-{max(speeds['torch']):.0f})"))
    for name in ("stratlm", "stratlm plain forward"):
        ratios = [a / b for a, b in zip(speeds[name], speeds["torch"])]
        print(f"compiled: {worker.hello['compiled']}; {name} / transformers per round: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        table.append((f"b1 {name}, interleaved with it", f"{statistics.median(speeds[name]):.0f} ({min(speeds[name]):.0f}-{max(speeds[name]):.0f})"))
        table.append((f"b1 ratio {name}/transformers+compile", f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})x"))


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    print("mlx", mx.__version__, mx.default_device(), flush=True)
    wanted = set(os.environ.get("GPU_BENCH_SECTIONS", "correctness,batch1,profile,variants,batchN,transformers").split(","))
    if "correctness" in wanted:
        correctness()
    loaded = bench_model(MODEL, "bfloat16")
    folder = model_folder(loaded)
    if "correctness" in wanted:
        bf16_agreement(folder, loaded)
    if "batch1" in wanted:
        batch1()
    if "profile" in wanted:
        profile(folder, loaded)
    if "variants" in wanted:
        batch1_variants(folder, loaded)
    if "batchN" in wanted:
        batch64()
    mx.clear_cache()
    if "transformers" in wanted:
        transformers_compiled(folder, loaded)
    print(f"\n=== summary ({MODEL}, bf16, prompt {PROMPT}, {NEW} new tokens) ===")
    for what, value in table:
        print(f"{what:<40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
