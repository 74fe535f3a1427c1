"""`stratlm bench`: stratlm and mlx-lm on the same model, prompt and token count, in one run.

Repetitions are interleaved (every engine once per round, the order rotating), because
these machines are noisy: ratios are taken per round, between runs made side by side.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from importlib import metadata
from typing import Any, Callable, Sequence, TypeVar

import attrs
import mlx.core as mx

from stratlm.device import cpu_active
from stratlm.core.errors import ConfigError

from .engines import Measurement, MlxLmEngine, StratlmEngine, measure_bandwidth
from .models import bench_model, model_folder, prompt_tokens, weight_bytes_per_token

Runner = Callable[[Sequence[int], int, int], Measurement]
T = TypeVar("T")
SINGLE_ROW = ("greedy", "sample")
BASELINES = ("all", "same-process", "none", "llama.cpp")
LLAMA_CPP_THREADS = (1, 2)


@attrs.frozen
class BenchConfig:
    model: str | None = None  # None: the embedded SmolLM2
    strategy: str = "greedy"
    batch: int = 1
    prompt_tokens: int = 64
    max_tokens: int = 128
    dtype: str | None = None  # None: fp32 on the CPU, bf16 on a GPU
    reps: int = 5
    warmup: int = 1
    # comma-separated: all (mlx-lm here and in subprocesses) | same-process (mlx-lm here) | none |
    # llama.cpp (llama-cpp-python on the same GGUF, 1 and 2 threads; only when named)
    baselines: str = "all"
    options: dict[str, Any] = attrs.field(factory=dict)
    prompt: str | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("batch", "prompt_tokens", "max_tokens", "reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        parts = self.baseline_set
        if not parts or not parts <= set(BASELINES) or ("none" in parts and len(parts) > 1):
            raise ConfigError(f"--baselines must be a comma-separated list of {', '.join(BASELINES)} (none alone), got {self.baselines!r}")
        if self.batch > 1 and self.strategy in SINGLE_ROW[1:]:
            raise ConfigError(f"strategy {self.strategy!r} decodes one row; use --strategy batch (or greedy) with --batch")


    @property
    def baseline_set(self) -> set[str]:
        return {p.strip() for p in self.baselines.split(",") if p.strip()}

    @property
    def mlx_lm(self) -> str | None:
        """all | same-process | None: which mlx-lm runs the baselines ask for."""
        parts = self.baseline_set
        return "all" if "all" in parts else "same-process" if "same-process" in parts else None


@attrs.frozen
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))

    def __str__(self) -> str:
        return f"{fmt(self.median)} ({fmt(self.low)}-{fmt(self.high)})"


@attrs.frozen
class EngineSummary:
    name: str
    prefill_tps: Spread
    decode_tps: Spread
    wall_s: Spread
    peak_gb: float
    tokens: int
    first_difference: int | None  # first position where row 0 differs from stratlm's (None: identical)


@attrs.frozen
class BenchReport:
    config: BenchConfig
    machine: dict[str, Any]
    engines: list[EngineSummary]
    decode_ratios: dict[str, Spread]  # stratlm / engine, paired per round
    prefill_ratios: dict[str, Spread]
    weight_bytes_per_token: int
    bandwidth_bytes_per_s: float

    @property
    def limit_tps(self) -> float:
        """Decode tokens/s (per row) if reading the weights at the measured bandwidth were all the cost."""
        return self.bandwidth_bytes_per_s / self.weight_bytes_per_token

    def to_json(self) -> str:
        data = attrs.asdict(self)
        data["limit_tps"] = self.limit_tps
        return json.dumps(data, indent=2)


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> BenchReport:
    llama = "llama.cpp" in config.baseline_set
    if llama:
        check_llama_cpp(config)
    loaded = bench_model(config.model, config.dtype)
    if llama and (loaded.path is None or loaded.path.suffix != ".gguf"):
        raise ConfigError(f"the llama.cpp baseline runs the same .gguf file; {config.model or 'the model'} is not one (use the embedded model or a .gguf path)")
    prompt = prompt_tokens(loaded, config.prompt_tokens, config.prompt)
    engines: dict[str, Runner] = {}
    strategy = "batch" if config.batch > 1 and config.strategy == "greedy" else config.strategy
    engines["stratlm"] = StratlmEngine(loaded, strategy, **config.options).run
    if strategy not in ("greedy", "batch"):
        engines["stratlm greedy"] = StratlmEngine(loaded, "greedy" if config.batch == 1 else "batch").run
    folder = model_folder(loaded, dtype=config.dtype) if config.mlx_lm else None
    workers: list[Worker] = []
    try:
        if llama:
            for threads in LLAMA_CPP_THREADS:
                progress(f"loading llama.cpp, {threads} thread{'s' * (threads > 1)}")
                worker = Worker("", {}, llama_cpp_command(str(loaded.path), threads, len(prompt) + config.max_tokens + 16))
                workers.append(worker)
                engines[f"llama.cpp, {threads} thread{'s' * (threads > 1)}"] = worker.run
        if folder is not None:
            engines["mlx-lm, same process"] = MlxLmEngine(str(folder)).run
        if folder is not None and config.mlx_lm == "all" and cpu_active():
            for name, env in cpu_baselines().items():
                worker = Worker(str(folder), env)
                workers.append(worker)
                engines[name] = worker.run
        progress("measuring memory bandwidth")
        bandwidth = measure_bandwidth()
        rows = config.batch
        warm_tokens = min(config.max_tokens, 32)
        for name, run in engines.items():
            for _ in range(config.warmup):
                progress(f"warm-up: {name}")
                run(prompt, warm_tokens, rows)
        measured = interleaved({name: functools.partial(run, prompt, config.max_tokens, rows) for name, run in engines.items()}, config.reps, progress)
    finally:
        for worker in workers:
            worker.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return summarize(config, measured, weight_bytes_per_token(loaded), bandwidth)


def interleaved(runs: dict[str, Callable[[], T]], reps: int, progress: Callable[[str], None] = lambda _: None) -> dict[str, list[T]]:
    """Every run once a round for `reps` rounds, the one going first rotating: on these noisy
    machines only results taken side by side, round by round, compare."""
    measured: dict[str, list[T]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            progress(f"round {rep + 1}/{reps}: {name}")
            measured[name].append(runs[name]())
    return measured


def summarize(config: BenchConfig, measured: dict[str, list[Measurement]], weight_bytes: int, bandwidth: float) -> BenchReport:
    ours = measured["stratlm"]
    summaries = []
    for name, runs in measured.items():
        summaries.append(
            EngineSummary(
                name=name,
                prefill_tps=Spread.of([m.prompt_tps for m in runs]),
                decode_tps=Spread.of([m.decode_tps for m in runs]),
                wall_s=Spread.of([m.wall_s for m in runs]),
                peak_gb=statistics.median(m.peak_gb for m in runs),
                tokens=runs[0].tokens,
                first_difference=first_difference(ours[0].token_ids, runs[0].token_ids),
            )
        )
    others = [n for n in measured if n != "stratlm"]
    return BenchReport(
        config=config,
        machine=machine_info(),
        engines=summaries,
        decode_ratios={n: Spread.of([a.decode_tps / b.decode_tps for a, b in zip(ours, measured[n]) if b.decode_tps > 0]) for n in others},
        prefill_ratios={n: Spread.of([a.prompt_tps / b.prompt_tps for a, b in zip(ours, measured[n]) if b.prompt_tps > 0]) for n in others},
        weight_bytes_per_token=weight_bytes,
        bandwidth_bytes_per_s=bandwidth,
    )


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def cpu_baselines() -> dict[str, dict[str, str]]:
    """mlx-lm in other processes: as a user installs it, and with plain OpenBLAS."""
    from stratlm.backends.cpu.blas import status

    baselines = {"mlx-lm, bundled BLAS": {"STRATLM_BLAS": "off"}}
    if status["library"] and status["gemv_routing"]:
        baselines["mlx-lm, OpenBLAS"] = {"STRATLM_BLAS": status["library"], "STRATLM_BLAS_GEMV": "off"}
    return baselines


def check_llama_cpp(config: BenchConfig) -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(
            "--baselines llama.cpp needs llama-cpp-python, which is not installed: "
            "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install 'stratlm[bench]' (it builds llama.cpp from source, several minutes)"
        )
    if config.batch != 1 or config.strategy != "greedy":
        raise ConfigError(f"the llama.cpp baseline decodes one row greedily; drop --batch/--strategy (got batch {config.batch}, strategy {config.strategy!r})")


def llama_cpp_command(gguf: str, threads: int, n_ctx: int) -> list[str]:
    """llama.cpp in its own process, run as a plain script: neither stratlm nor MLX is imported there."""
    from pathlib import Path

    return [sys.executable, str(Path(__file__).with_name("llama_worker.py")), gguf, str(threads), str(n_ctx)]


class Worker:
    """An engine in a subprocess: by default mlx-lm (stratlm.bench.worker). The process prints a
    JSON line when ready, then answers each request line ({"prompt", "max_tokens", "batch"}) with
    a Measurement's fields as one JSON line."""

    def __init__(self, folder: str, env: dict[str, str], command: Sequence[str] | None = None):
        if command is None:
            command, self.what = [sys.executable, "-m", "stratlm.bench.worker", folder], "the mlx-lm benchmark worker"
            self.hint = "; is mlx-lm installed? (pip install 'stratlm[bench]')"
        else:
            self.what, self.hint = f"the benchmark worker {' '.join(command[:2])}", ""
        self.process = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            raise ConfigError(f"{self.what} exited (code {self.process.poll()}){self.hint}")
        return json.loads(line)

    def run(self, prompt: Sequence[int], max_tokens: int, batch: int = 1) -> Measurement:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"prompt": list(prompt), "max_tokens": max_tokens, "batch": batch}) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise ConfigError(f"{self.what}: {answer['error']}")
        return Measurement(**answer)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def machine_info() -> dict[str, Any]:
    from stratlm.backends.cpu.blas import status

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    device = mx.default_device()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "device": str(device),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx-lm": version("mlx-lm"),
        "stratlm": version("stratlm"),
        "blas": status["library"] or "MLX bundled reference BLAS",
        "gemv routing": bool(status["gemv_routing"]),
    }
    if device == mx.gpu:
        info["gpu"] = mx.device_info().get("device_name", "gpu") if hasattr(mx, "device_info") else "gpu"
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def format_report(report: BenchReport) -> str:
    c, m = report.config, report.machine
    dtype = c.dtype or ("bfloat16" if m["device"].startswith("Device(gpu") or "gpu" in m["device"] else "float32")
    lines = [
        f"stratlm bench: {c.model or 'smollm2-135m (embedded)'} {dtype}, strategy {c.strategy}, batch {c.batch}, "
        f"prompt {c.prompt_tokens} tokens, {c.max_tokens} new tokens, {c.reps} rounds",
        f"machine: {m['processor']}, {m['cpus']} cpus, {m['device']}; mlx {m['mlx']}, mlx-lm {m['mlx-lm']}; "
        f"BLAS {m['blas']}{' + gemv routing' if m['gemv routing'] else ''}; {m['date']}",
        "",
        f"{'engine':<24}{'prefill tok/s':>22}{'decode tok/s':>24}{'peak GB':>9}  tokens",
    ]
    for e in report.engines:
        same = "" if e.name == "stratlm" else ("  same tokens" if e.first_difference is None else f"  differs from token {e.first_difference}")
        lines.append(f"{e.name:<24}{str(e.prefill_tps):>22}{str(e.decode_tps):>24}{e.peak_gb:>9.3f}  {e.tokens}{same}")
    if report.decode_ratios:
        lines += ["", "stratlm / engine, per round: median (min-max)"]
        for name, ratio in report.decode_ratios.items():
            lines.append(f"  {name:<22} decode {ratio}x   prefill {report.prefill_ratios[name]}x")
    ours = report.engines[0].decode_tps.median / max(1, c.batch)
    lines += [
        "",
        f"weights read per token: {report.weight_bytes_per_token / 1e6:.0f} MB; best measured bandwidth "
        f"{report.bandwidth_bytes_per_s / 1e9:.1f} GB/s -> at most {fmt(report.limit_tps)} decode steps/s; "
        f"stratlm: {fmt(ours)} steps/s = {100 * ours / report.limit_tps:.0f}% of that limit",
    ]
    return "\n".join(lines)
