"""The batched decode loop (shared by batch, best-of-n and vote) and the `batch` strategy.

Prompts of different lengths are left-padded into one batch; the cache gives each row its
own RoPE offset and masks the padding. One sampler step covers all rows per forward. Each
row stops on its own (EOS, stop string, max_tokens, via `Completion`) and is then dropped
from the batch, so finished rows cost no more work and nothing after their end is reported.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import mlx.core as mx

from stratlm.core.errors import ConfigError
from stratlm.decoding.completion import Completion, Timer
from stratlm.decoding.loop import prefill, token_logprobs
from stratlm.decoding.sampler import Sampler
from stratlm.core.strategy import RequestPolicy, Strategy
from stratlm.core.types import GenerationParams, GenerationResult

from .options import int_option

RowEvent = tuple[int, "str | GenerationResult"]


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if len(prompts) == 0:
        raise ConfigError("the prompt list is empty; give at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ConfigError(f"prompt {i} has no tokens; every prompt needs at least one token")


def run_batch(
    target: Any,
    prompts: Sequence[Sequence[int]],
    params: GenerationParams,
    sampler: Sampler | None = None,
    *,
    copies: int = 1,
    stream: bool = True,
) -> Iterator[RowEvent]:
    """Decode the prompts together; yield (row, text piece) as text is ready (only with
    `stream`) and (row, GenerationResult) when a row finishes. With `copies` > 1 each prompt
    is prefilled once and its cache rows replicated: row r decodes prompt r // copies.

    `target` is a LoadedModel.
    """
    check_prompts(prompts)
    model, tokenizer, eos = target.model, target.tokenizer, target.eos_token_ids
    sampler = sampler or Sampler(params.sampling)

    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    # Pad with the row's own first token: padded keys are masked anyway, and a token the row
    # already holds leaves the repetition penalty's history unchanged (the generated tokens,
    # which the presence and frequency penalties count, start after the padded prompt).
    tokens = mx.array([[p[0]] * pad + list(p) for p, pad in zip(prompts, padding)], dtype=mx.int32)
    rows = [i for i in range(len(prompts)) for _ in range(copies)]  # batch row -> prompt
    timer = Timer()
    cache = model.make_cache(left_padding=padding)
    logits = prefill(model, tokens, cache)
    if copies > 1:
        index = mx.array(rows, dtype=mx.int32)
        for layer_cache in cache:
            layer_cache.filter(rows)  # the host list: no read back of the index, layer by layer
        logits, tokens = logits[index], tokens[index]
    history = sampler.start_history(tokens)

    def pick(logits: mx.array, history: mx.array | None) -> tuple[mx.array, mx.array | None]:
        token = sampler.sample(logits, history)
        lp = token_logprobs(logits, token) if params.logprobs else None
        mx.async_eval(token, lp) if lp is not None else mx.async_eval(token)
        return token, lp

    completions = [Completion(tokenizer, params, eos, stream=stream) for _ in rows]
    active = list(range(len(rows)))  # batch position -> output row
    token, lp = pick(logits, history)
    while active:
        if history is not None:
            history = history.append(token)
        # queue the next step before reading this one, so the device never waits on the host
        next_token, next_lp = pick(model(token[:, None], cache)[:, -1, :], history)
        chosen = token.tolist()
        chosen_lp = lp.tolist() if lp is not None else [None] * len(chosen)
        timer.mark_first_token()
        keep = []
        for position, row in enumerate(active):
            completion = completions[row]
            piece = completion.add(chosen[position], chosen_lp[position])
            if piece:
                yield row, piece
            if completion.finished:
                # the first token costs the prefill; generation speed counts the tokens after it
                stats = timer.stats(len(prompts[rows[row]]), max(0, completion.generated - 1))
                yield row, completion.result(stats)
            else:
                keep.append(position)
        if len(keep) < len(active):
            active = [active[p] for p in keep]
            if not active:
                break
            index = mx.array(keep, dtype=mx.int32)
            for layer_cache in cache:
                layer_cache.filter(keep)
            next_token = next_token[index]
            next_lp = next_lp[index] if next_lp is not None else None
            history = history.rows(index) if history is not None else None
        token, lp = next_token, next_lp


def batch_results(events: Iterator[RowEvent], n_rows: int) -> list[GenerationResult]:
    """The results of run_batch, in row order."""
    results: list[GenerationResult | None] = [None] * n_rows
    for row, item in events:
        if isinstance(item, GenerationResult):
            results[row] = item
    return results  # type: ignore[return-value]


class Batch(Strategy):
    """All prompts decoded together in one left-padded batch (at most `batch_size` rows at a time)."""

    name = "batch"
    options = ("batch_size",)
    default_temperature = 0.0

    def __init__(self, target: Any, batch_size: int | str | None = None, **options: Any):
        super().__init__(target, **options)
        self.batch_size = None if batch_size is None else int_option(self.name, "batch_size", batch_size)

    def policy(self, prompt: Sequence[int], params: GenerationParams) -> RequestPolicy:
        return RequestPolicy(params)  # in the scheduler every request shares one continuous batch

    def generate(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GenerationResult]:
        check_prompts(prompts)
        size = self.batch_size or len(prompts)
        sampler = Sampler(params.sampling, self.registry)
        results: list[GenerationResult] = []
        for start in range(0, len(prompts), size):
            group = prompts[start : start + size]
            results += batch_results(run_batch(self.target, group, params, sampler, stream=False), len(group))
        return results

    def stream(self, prompt: Sequence[int], params: GenerationParams) -> Iterator[str | GenerationResult]:
        for _, item in run_batch(self.target, [prompt], params, Sampler(params.sampling, self.registry)):
            yield item
