"""`stratlm bench --load N`: many requests arriving over time, the way a server sees them.

The same workload (seeded: prompt and output lengths, Poisson arrival times) is fed to
  - stratlm's scheduler (continuous batching, requests submitted at their arrival times),
  - mlx-lm's BatchGenerator (its continuous batching), given each request at its arrival time,
  - stratlm's static batch (every request at once, no arrivals: the upper bound),
and each reports output tokens/s, time to first token and inter-token latency (p50/p99).
Then the prefix cache: the time to first token of a second chat turn over a long history,
against a cold prefill of the same prompt.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable

import attrs
import numpy as np

from stratlm.core.model import LoadedModel


@attrs.frozen
class LoadConfig:
    requests: int = 64
    rate: float = 0.0  # arrivals per second (Poisson); 0: all at once
    prompt_tokens: int = 64  # mean; each request draws from [half, 1.5x]
    max_tokens: int = 64  # mean, likewise
    seed: int = 0
    history_tokens: int = 2000  # the chat-turn measurement's history


@attrs.frozen
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    arrivals: list[float]  # seconds after the start


@attrs.frozen
class LoadResult:
    engine: str
    tokens: int
    wall: float
    ttft: list[float]
    itl: list[float]  # per request: mean seconds between its tokens after the first

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    def row(self) -> dict[str, Any]:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else 0.0  # noqa: E731
        return {"engine": self.engine, "tokens": self.tokens, "wall_s": self.wall, "tok_per_s": self.throughput,
                "ttft_p50_ms": 1e3 * pct(self.ttft, 50), "ttft_p99_ms": 1e3 * pct(self.ttft, 99),
                "itl_p50_ms": 1e3 * pct(self.itl, 50), "itl_p99_ms": 1e3 * pct(self.itl, 99)}


def make_workload(loaded: LoadedModel, config: LoadConfig, text_tokens: Callable[[int], list[int]]) -> Workload:
    rng = random.Random(config.seed)
    prompts, lengths, arrivals, t = [], [], [], 0.0
    for _ in range(config.requests):
        n = rng.randint(max(1, config.prompt_tokens // 2), max(1, config.prompt_tokens * 3 // 2))
        start = rng.randint(0, 500)
        prompts.append(text_tokens(start + n)[start:])  # different prompts: no accidental prefix sharing
        lengths.append(rng.randint(max(1, config.max_tokens // 2), max(1, config.max_tokens * 3 // 2)))
        arrivals.append(t)
        if config.rate > 0:
            t += rng.expovariate(config.rate)
    return Workload(prompts, lengths, arrivals)


def warmup_workload(work: Workload, rows: int, max_tokens: int = 8) -> Workload:
    """A short unmeasured pass before each engine's timed one: kernels compiled (MLX's JIT, CUDA
    kernels per template) and caches allocated at the row counts the load will reach, so a cold
    process's one-time costs do not count as throughput (mlx-lm's and ours alike)."""
    n = min(len(work.prompts), rows)
    return Workload(work.prompts[:n], [min(max_tokens, m) for m in work.max_tokens[:n]], [0.0] * n)


def run_stratlm(loaded: LoadedModel, work: Workload, max_running: int, readers: str = "streams") -> LoadResult:
    """The scheduler, each request submitted at its arrival time and read by a thread of its own:
    `readers` "streams" iterate the text as it comes (each thread woken every step), "results"
    wait for the result alone (as Engine.generate's callers do)."""
    from stratlm import Engine

    engine = Engine(loaded, scheduler={"max_running": max_running, "prefix_cache_bytes": 0, "max_queue": max(1024, len(work.prompts))})
    scheduler, strategy = engine.scheduler, engine.strategy
    results: list[Any] = [None] * len(work.prompts)

    def consume(i: int, handle) -> None:
        if readers == "streams":
            for _ in handle:
                pass
        results[i] = handle.result()

    start = time.perf_counter()
    threads, ends = [], [0.0] * len(work.prompts)
    for i, (prompt, n, at) in enumerate(zip(work.prompts, work.max_tokens, work.arrivals)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handle = scheduler.submit(prompt, engine.params(max_tokens=n, ignore_eos=True), strategy)
        thread = threading.Thread(target=lambda i=i, h=handle: (consume(i, h), ends.__setitem__(i, time.perf_counter())), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall = max(ends) - start
    engine.close()
    # the scheduler's own clocks: submit -> first token (queue + prefill), then per token
    stats = [r.stats for r in results]
    label = "stratlm scheduler" if readers == "streams" else "stratlm scheduler, result readers"
    return LoadResult(label, sum(len(r.token_ids) for r in results), wall, [s.queue_time + s.prompt_time for s in stats],
                      [s.generation_time / max(1, s.generation_tokens) for s in stats])


def run_static(loaded: LoadedModel, work: Workload, wave: int | None = None) -> LoadResult:
    """The static batch, arrivals ignored: every prompt at once, or in waves of `wave` rows (the
    same concurrency as the scheduler's), each wave one batch after the last."""
    from stratlm.strategies.batched import run_batch
    from stratlm.engine import make_params

    wave = wave or len(work.prompts)
    # a row cannot leave its batch early, so the tokens past its own max_tokens are work nobody
    # asked for: only the requested ones count (as the other engines' do)
    start = time.perf_counter()
    first: dict[int, float] = {}
    for w0 in range(0, len(work.prompts), wave):
        params = make_params(max_tokens=max(work.max_tokens[w0 : w0 + wave]), ignore_eos=True)
        for row, _ in run_batch(loaded, work.prompts[w0 : w0 + wave], params, stream=True):
            first.setdefault(w0 + row, time.perf_counter())
    wall = time.perf_counter() - start
    label = "stratlm static batch (all at once)" if wave >= len(work.prompts) else f"stratlm static batch (waves of {wave})"
    return LoadResult(label, sum(work.max_tokens), wall, [first.get(i, wall + start) - start for i in range(len(work.prompts))], [])


def run_mlx_lm(folder: str, work: Workload, max_running: int) -> LoadResult:
    import mlx_lm
    from mlx_lm.generate import BatchGenerator

    model, _ = mlx_lm.load(str(folder))
    gen = BatchGenerator(model, completion_batch_size=max_running, prefill_batch_size=min(8, max_running), stop_tokens=[])
    n = len(work.prompts)
    first: list[float | None] = [None] * n
    ends, counts, arrived = [0.0] * n, [0] * n, [0.0] * n
    uid_of: dict[int, int] = {}
    start = time.perf_counter()
    nxt = done = 0
    while done < n:
        now = time.perf_counter() - start
        batch = []
        while nxt < n and work.arrivals[nxt] <= now:
            batch.append(nxt)
            nxt += 1
        if batch:
            uids = gen.insert([work.prompts[i] for i in batch], [work.max_tokens[i] for i in batch])
            for uid, i in zip(uids, batch):
                uid_of[uid] = i
                arrived[i] = time.perf_counter()
        if not uid_of or all(ends[i] for i in uid_of.values()):
            if nxt < n:
                time.sleep(max(0.0, work.arrivals[nxt] - (time.perf_counter() - start)))
                continue
        _, responses = gen.next()
        t = time.perf_counter()
        for r in responses:
            i = uid_of[r.uid]
            counts[i] += 1
            if first[i] is None:
                first[i] = t
            if r.finish_reason is not None:
                ends[i] = t
                done += 1
    gen.close()
    first = [f if f is not None else e for f, e in zip(first, ends)]
    return LoadResult("mlx-lm BatchGenerator", sum(counts), max(ends) - start, [f - a for f, a in zip(first, arrived)],
                      [(e - f) / max(1, c - 1) for f, e, c in zip(first, ends, counts)])


def chat_turn_ttft(loaded: LoadedModel, history_tokens: int, text: str) -> dict[str, float]:
    """Time to first token of a second chat turn whose history (~history_tokens) the prefix
    cache holds, against a cold prefill of the same prompt (the cache off)."""
    from stratlm import Engine

    words = text.split()
    history = " ".join((words * (history_tokens // max(1, len(words)) + 2)))
    ids = loaded.tokenizer.encode(history, add_special_tokens=False)[:history_tokens]
    history = loaded.tokenizer.decode(ids)
    turn1 = [{"role": "user", "content": history + "\nSummarize this."}]
    warm = Engine(loaded)
    first = warm.generate(turn1, max_tokens=8)
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter, please."}]
    second = warm.generate(turn2, max_tokens=1)
    warm.close()
    cold = Engine(loaded, scheduler={"prefix_cache_bytes": 0})
    cold_result = cold.generate(turn2, max_tokens=1)
    cold.close()
    return {"prompt_tokens": second.stats.prompt_tokens, "cached_tokens": second.stats.cached_prompt_tokens,
            "warm_ttft_ms": 1e3 * second.stats.prompt_time, "cold_ttft_ms": 1e3 * cold_result.stats.prompt_time,
            "speedup": cold_result.stats.prompt_time / max(1e-9, second.stats.prompt_time)}


def format_load_report(rows: list[dict[str, Any]], chat: dict[str, float] | None, header: str) -> str:
    lines = [header, f"{'engine':38s} {'tok/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s}  (ms)"]
    for r in rows:
        lines.append(f"{r['engine']:38s} {r['tok_per_s']:9.1f} {r['ttft_p50_ms']:9.1f} {r['ttft_p99_ms']:9.1f} {r['itl_p50_ms']:8.1f} {r['itl_p99_ms']:8.1f}")
    ours = [r for r in rows if r["engine"].startswith("stratlm scheduler")]
    for mine in ours:
        for r in rows:
            if r not in ours and r["tok_per_s"] > 0:
                lines.append(f"{mine['engine']} / {r['engine']}: {mine['tok_per_s'] / r['tok_per_s']:.2f}x tokens/s")
    if chat:
        lines.append(f"second chat turn over {chat['prompt_tokens']} prompt tokens ({chat['cached_tokens']} cached): "
                     f"TTFT {chat['warm_ttft_ms']:.1f} ms vs cold {chat['cold_ttft_ms']:.1f} ms = {chat['speedup']:.1f}x shorter")
    return "\n".join(lines)
