"""Sampler semantics: greedy at temperature 0, the top-k / top-p / min-p filters and the
repetition penalty against transformers' logits processors, and seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx

from stratlm.core.errors import ConfigError
from stratlm.decoding.processors import History
from stratlm.decoding.sampler import Sampler
from stratlm.core.types import SamplingParams

V = 50


def random_logits(seed: int, rows: int = 2) -> np.ndarray:
    return (np.random.RandomState(seed).randn(rows, V) * 3).astype(np.float32)


def kept(sampler: Sampler, logits: np.ndarray) -> np.ndarray:
    return np.isfinite(np.array(sampler.distribution(mx.array(logits))))


def test_temperature_zero_is_argmax_whatever_the_seed():
    logits = random_logits(0, rows=4)
    for seed in (None, 0, 1):
        sampler = Sampler(SamplingParams(temperature=0.0, top_k=3, seed=seed))
        assert np.array(sampler.sample(mx.array(logits))).tolist() == logits.argmax(-1).tolist()
    dist = np.array(Sampler(SamplingParams()).distribution(mx.array(logits)))
    assert np.allclose(np.exp(dist).sum(-1), 1, atol=1e-5) and (dist.argmax(-1) == logits.argmax(-1)).all()


@given(seed=st.integers(0, 10_000), k=st.integers(1, V), temperature=st.floats(0.1, 3.0))
def test_top_k_keeps_the_k_largest(seed, k, temperature):
    logits = random_logits(seed)
    keep = kept(Sampler(SamplingParams(temperature=temperature, top_k=k)), logits)
    top = np.argsort(-logits, axis=-1)[:, :k]
    assert keep.sum(-1).tolist() == [k, k]
    assert all(keep[r, top[r]].all() for r in range(2))


def test_distribution_is_the_tempered_softmax_renormalised_over_the_kept_tokens():
    logits = random_logits(1)
    t = 0.7
    dist = np.exp(np.array(Sampler(SamplingParams(temperature=t, top_k=5)).distribution(mx.array(logits))))
    for r in range(2):
        top = np.argsort(-logits[r])[:5]
        expected = np.exp(logits[r, top] / t) / np.exp(logits[r, top] / t).sum()
        assert np.allclose(dist[r, top], expected, atol=1e-6)
        assert np.allclose(dist[r].sum(), 1, atol=1e-6)


def hf_processed(processor, logits: np.ndarray, input_ids=None) -> np.ndarray:
    import torch

    ids = torch.tensor(input_ids if input_ids is not None else [[0]] * logits.shape[0])
    return processor(ids, torch.tensor(logits)).numpy()


@pytest.mark.parametrize("option,warper,low,high", [("top_p", "TopPLogitsWarper", 0.05, 0.99), ("min_p", "MinPLogitsWarper", 0.01, 0.9)])
@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0, 1), temperature=st.floats(0.2, 2.0))
def test_nucleus_and_min_p_keep_the_same_tokens_as_transformers(option, warper, low, high, seed, fraction, temperature):
    transformers = pytest.importorskip("transformers")
    value = low + fraction * (high - low)
    logits = random_logits(seed)
    ours = kept(Sampler(SamplingParams(temperature=temperature, **{option: value})), logits)
    theirs = np.isfinite(hf_processed(getattr(transformers, warper)(value), logits / temperature))
    assert (ours == theirs).all()


@given(seed=st.integers(0, 10_000), penalty=st.floats(0.5, 3.0), history=st.lists(st.integers(0, V - 1), min_size=1, max_size=20))
def test_repetition_penalty_equals_transformers(seed, penalty, history):
    transformers = pytest.importorskip("transformers")
    logits = random_logits(seed, rows=1)
    ours = np.array(Sampler(SamplingParams(repetition_penalty=penalty)).process(mx.array(logits), History(mx.array([history], dtype=mx.int32), len(history))))
    theirs = hf_processed(transformers.RepetitionPenaltyLogitsProcessor(penalty), logits, [history])
    assert np.allclose(ours, theirs, atol=1e-5)


def test_repetition_penalty_looks_only_at_the_recent_window():
    logits = np.full((1, V), 2.0, np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, repetition_context=3))
    out = np.array(sampler.process(mx.array(logits), History(mx.array([[7, 8, 9, 10]], dtype=mx.int32), 4)))[0]
    assert out[7] == 2.0 and out[8] == out[9] == out[10] == 1.0
    assert Sampler(SamplingParams()).processors == []  # nothing asked, nothing applied


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = mx.array(np.zeros((1, V), np.float32))  # uniform: every draw is informative

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [int(sampler.sample(logits)[0]) for _ in range(20)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert len(set(draws(3))) > 5  # successive draws use fresh keys


def test_samples_follow_the_distribution():
    logits = np.log(np.array([[0.6, 0.3, 0.1, 1e-9]], np.float32)).repeat(6000, axis=0)
    tokens = np.array(Sampler(SamplingParams(temperature=1.0, seed=0)).sample(mx.array(logits)))
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    assert np.allclose(freq[:3], [0.6, 0.3, 0.1], atol=0.03) and freq[3] == 0
    filtered = np.array(Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0)).sample(mx.array(logits)))
    assert set(filtered.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs,message",
    [({"temperature": -0.1}, "temperature must be >= 0"), ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -1}, "top_k must be >= 0"), ({"min_p": 1.0}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty must be > 0")],
)
def test_bad_sampling_parameters_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)
