"""Property-based equivalences of the decoding strategies, on tiny random models.

batch == greedy per prompt; speculative (temperature 0, any draft, any num_draft) == greedy;
prompt-lookup speculative == greedy; best-of-n with n=1 at temperature 0 == greedy; vote over
n identical greedy samples == one answer with count n.
"""

from __future__ import annotations

import functools

from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategy_models import assert_same_greedy, noisy_copy, sharp_model, with_eos

from stratlm.core.registry import get_registry
from stratlm.core.types import GenerationParams

registry = get_registry()
tokens = st.integers(min_value=0, max_value=255)
prompt_ids = st.lists(tokens, min_size=1, max_size=12)
model_seeds = st.integers(min_value=0, max_value=2)


def strategy(name: str, loaded, **options):
    return registry.get("strategy", name)(loaded, **options)


@functools.lru_cache(maxsize=None)
def greedy_tokens(seed: int, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    """The reference: greedy decoding of one prompt alone, no EOS in the way."""
    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    return strategy("greedy", sharp_model(seed)).generate([list(prompt)], params)[0].token_ids


@settings(max_examples=25)
@example(seed=0, prompts=[[1], [0, 0]], max_tokens=2, eos_at=1)  # a one-token prompt padded by one: its padding query saw no key (NaN)
@example(seed=1, prompts=[[0], [1, 54]], max_tokens=2, eos_at=0)  # row 1 meets the tokenizer's own EOS
@given(seed=model_seeds, prompts=st.lists(prompt_ids, min_size=1, max_size=6), max_tokens=st.integers(1, 12), eos_at=st.integers(0, 11))
def test_batch_equals_greedy_per_prompt(seed, prompts, max_tokens, eos_at):
    target = sharp_model(seed)
    expected = [greedy_tokens(seed, tuple(p), max_tokens) for p in prompts]
    # make a token of the first row's output the EOS: rows then stop at different steps
    ending = with_eos(target, expected[0][min(eos_at, len(expected[0]) - 1)])
    stops = ending.eos_token_ids  # that token and the tokenizer's own EOS
    expected = [e[: next((i for i, t in enumerate(e) if t in stops), len(e))] for e in expected]
    results = strategy("batch", ending).generate(prompts, GenerationParams(max_tokens=max_tokens))
    assert len(results) == len(prompts)
    for prompt, result, want in zip(prompts, results, expected):
        assert_same_greedy(target, prompt, result.token_ids, want)
        assert not stops & set(result.token_ids)
        assert result.finish_reason == ("length" if len(want) == max_tokens else "stop")
        assert result.stats.prompt_tokens == len(prompt)
        # every sampled token after the first, the EOS included, and nothing after it
        assert result.stats.generation_tokens == len(result.token_ids) - (result.finish_reason == "length")


DRAFTS = st.sampled_from(["other model", "noisy copy", "slightly noisy copy", "itself"])


def draft_for(kind: str, seed: int):
    return {
        "other model": lambda: sharp_model(seed + 10, layers=1),
        "noisy copy": lambda: noisy_copy(seed, 0.5),
        "slightly noisy copy": lambda: noisy_copy(seed, 0.1),
        "itself": lambda: sharp_model(seed),
    }[kind]()


@settings(max_examples=25)
@given(seed=model_seeds, draft=DRAFTS, num_draft=st.integers(1, 6), prompt=prompt_ids, max_tokens=st.integers(1, 16))
def test_speculative_greedy_equals_greedy_for_any_draft(seed, draft, num_draft, prompt, max_tokens):
    target = sharp_model(seed)
    speculative = strategy("speculative", target, draft=draft_for(draft, seed), num_draft=num_draft)
    result = speculative.generate([prompt], GenerationParams(max_tokens=max_tokens, ignore_eos=True))[0]
    assert_same_greedy(target, prompt, result.token_ids, greedy_tokens(seed, tuple(prompt), max_tokens))
    assert 0.0 <= result.extra["acceptance_rate"] <= 1.0
    if draft == "itself" and result.extra["drafted"]:
        assert result.extra["acceptance_rate"] == 1.0


@settings(max_examples=25)
@given(seed=model_seeds, piece=st.lists(tokens, min_size=1, max_size=5), repeats=st.integers(1, 4), tail=prompt_ids,
       ngram=st.integers(1, 4), num_draft=st.integers(1, 8), max_tokens=st.integers(1, 24))
def test_prompt_lookup_speculative_equals_greedy(seed, piece, repeats, tail, ngram, num_draft, max_tokens):
    prompt = piece * repeats + tail + piece  # repeated n-grams, so lookup finds drafts
    target = sharp_model(seed)
    speculative = strategy("speculative", target, draft=f"lookup:{ngram}", num_draft=num_draft)
    result = speculative.generate([prompt], GenerationParams(max_tokens=max_tokens, ignore_eos=True))[0]
    assert_same_greedy(target, prompt, result.token_ids, greedy_tokens(seed, tuple(prompt), max_tokens))
    assert result.extra["accepted"] <= result.extra["drafted"]
    assert result.extra["target_forwards"] <= max(0, max_tokens - 1)


@settings(max_examples=10)
@given(seed=model_seeds, prompt=prompt_ids, max_tokens=st.integers(1, 10))
def test_best_of_one_greedy_equals_greedy(seed, prompt, max_tokens):
    target = sharp_model(seed)
    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    result = strategy("best-of-n", target, n=1).generate([prompt], params)[0]
    assert_same_greedy(target, prompt, result.token_ids, greedy_tokens(seed, tuple(prompt), max_tokens))
    assert len(result.extra["candidates"]) == 1


@settings(max_examples=10)
@given(seed=model_seeds, prompt=prompt_ids, n=st.integers(1, 6), max_tokens=st.integers(1, 8))
def test_vote_over_identical_greedy_samples_is_unanimous(seed, prompt, n, max_tokens):
    target = sharp_model(seed)
    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    result = strategy("vote", target, n=n, extractor=repr).generate([prompt], params)[0]
    assert result.extra["count"] == n
    assert result.extra["votes"] == {result.extra["answer"]: n}
    assert result.extra["answer"] == repr(result.text)
    assert_same_greedy(target, prompt, result.token_ids, greedy_tokens(seed, tuple(prompt), max_tokens))
