"""One timed generation per call, for each engine the benchmark compares.

Every engine generates exactly `max_tokens` tokens per row (EOS ignored) from the same
prompt ids, and reports the same quantities, measured the same way:
prefill tok/s = prompt tokens / time to the first token; decode tok/s = tokens after the
first / time after the first; peak GB = the run's peak MLX memory above what was allocated
before it, plus the engine's weights (so two models in one process do not count twice).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Sequence

import attrs
import mlx.core as mx


@attrs.frozen
class Measurement:
    prompt_tps: float
    decode_tps: float
    wall_s: float
    tokens: int  # generated per row
    peak_gb: float
    token_ids: tuple[int, ...] = attrs.field(converter=tuple)  # row 0, for the equality check


def settled_memory() -> int:
    """MLX's active memory once the previous run's arrays are gone (a generator's frames can hold
    its cache in a reference cycle): the baseline a run's peak is taken above."""
    gc.collect()
    return mx.get_active_memory()


class StratlmEngine:
    """stratlm's public API: a strategy from the registry over an already loaded model."""

    def __init__(self, loaded: Any, strategy: str = "greedy", **options: Any):
        from stratlm.engine import Engine

        self.engine = Engine(loaded, strategy, **options)
        self.weight_bytes = parameter_bytes(loaded.model)

    def run(self, prompt: Sequence[int], max_tokens: int, batch: int = 1) -> Measurement:
        params = self.engine.params(max_tokens=max_tokens, ignore_eos=True)
        before = settled_memory()
        start = time.perf_counter()
        results = self.engine.strategy.generate([list(prompt)] * batch, params)
        wall = time.perf_counter() - start
        stats = [r.stats for r in results]
        gen_time = max(s.generation_time for s in stats)
        return Measurement(
            prompt_tps=len(prompt) * batch / max(s.prompt_time for s in stats),
            decode_tps=sum(s.generation_tokens for s in stats) / gen_time if gen_time > 0 else 0.0,
            wall_s=wall,
            tokens=len(results[0].token_ids),
            peak_gb=(max(s.peak_memory_gb for s in stats) * 1e9 - before + self.weight_bytes) / 1e9,
            token_ids=results[0].token_ids,
        )


class MlxLmEngine:
    """mlx-lm as its users call it: stream_generate for one row, batch_generate for several."""

    def __init__(self, folder: str):
        import mlx_lm  # the optional `bench` extra; never imported by stratlm's runtime

        self.model, self.tokenizer = mlx_lm.load(str(folder))
        self.tokenizer.eos_token_ids = set()  # generate exactly max_tokens, like ignore_eos
        self.weight_bytes = parameter_bytes(self.model)

    def run(self, prompt: Sequence[int], max_tokens: int, batch: int = 1) -> Measurement:
        from mlx_lm.generate import batch_generate, stream_generate

        mx.reset_peak_memory()
        before = settled_memory()
        start = time.perf_counter()
        if batch == 1:
            tokens: list[int] = []
            for response in stream_generate(self.model, self.tokenizer, list(prompt), max_tokens=max_tokens):
                tokens.append(response.token)
            wall = time.perf_counter() - start
            n = response.generation_tokens
            gen_time = n / response.generation_tps if response.generation_tps > 0 else 0.0
            prompt_tps, decode_tps = response.prompt_tps, (n - 1) / gen_time if gen_time > 0 else 0.0
        else:
            # mlx-lm's defaults decode at most 32 rows (and prefill 8) at a time: give it the whole batch
            response = batch_generate(self.model, self.tokenizer, [list(prompt)] * batch, max_tokens=max_tokens, return_token_ids=True,
                                      completion_batch_size=batch, prefill_batch_size=batch)
            wall = time.perf_counter() - start
            tokens = list(response.token_ids[0])
            s = response.stats
            prompt_tps, decode_tps = s.prompt_tps, s.generation_tps
        peak = mx.get_peak_memory()
        return Measurement(prompt_tps, decode_tps, wall, len(tokens), (peak - before + self.weight_bytes) / 1e9, tokens)


def parameter_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def measure_bandwidth(seconds: float = 0.5) -> float:
    """Best memory bandwidth seen (bytes/s) on the default device: a large copy (bytes read
    plus written) and a large matrix-vector product (bytes read), whichever is higher."""
    on_gpu = mx.default_device() == mx.gpu
    n = (1 << 28) if on_gpu else (1 << 24)  # 1 GiB / 64 MiB of fp32: well past the caches
    x = mx.random.uniform(shape=(n,))
    w = mx.random.uniform(shape=(n // 1024, 1024))
    v = mx.random.uniform(shape=(1, 1024))
    mx.eval(x, w, v)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        mx.eval(x + 1)
        best = max(best, 2 * x.nbytes / (time.perf_counter() - start))
        start = time.perf_counter()
        mx.eval(v @ w.T)
        best = max(best, w.nbytes / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            break
    del x, w, v
    return best
