"""Logits processors: the built-ins against a numpy reference (each batch row with its own
history), logit_bias forcing and banning tokens in every strategy, the penalties giving the same
tokens batched, alone and speculative, a plugin's processor taking effect, and bad values."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_models import sharp_model

from stratlm.core.errors import ConfigError
from stratlm.core.registry import Registry
from stratlm.core.types import SamplingParams
from stratlm.decoding.processors import History
from stratlm.decoding.sampler import Sampler
from stratlm.engine import Engine, make_params
from stratlm.testing import write_plugin_distribution

V = 40
STRATEGIES = ["greedy", "sample", "batch", "best-of-n", "vote", "speculative"]


def reference(logits: np.ndarray, tokens: np.ndarray, start: int, p: SamplingParams) -> np.ndarray:
    """The processors written plainly, one row at a time (OpenAI's and CTRL's definitions)."""
    out = logits.astype(np.float64).copy()
    for r in range(out.shape[0]):
        if p.repetition_penalty != 1.0:
            for t in set(tokens[r, -p.repetition_context :].tolist()):
                out[r, t] = out[r, t] * p.repetition_penalty if out[r, t] < 0 else out[r, t] / p.repetition_penalty
        counts = np.bincount(tokens[r, start:], minlength=out.shape[1])
        out[r] -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
    for t, b in p.logit_bias.items():
        out[:, t] += b
    return out


@settings(max_examples=40)
@given(
    seed=st.integers(0, 10_000),
    prompt_len=st.integers(1, 8),
    generated=st.integers(0, 10),
    repetition=st.sampled_from([1.0, 1.3, 0.8]),
    context=st.integers(1, 6),
    presence=st.floats(-2, 2),
    frequency=st.floats(-2, 2),
    bias=st.dictionaries(st.integers(0, V - 1), st.floats(-100, 100), max_size=4),
)
def test_builtin_processors_equal_a_numpy_reference_row_by_row(seed, prompt_len, generated, repetition, context, presence, frequency, bias):
    rng = np.random.RandomState(seed)
    logits = (rng.randn(3, V) * 3).astype(np.float32)
    tokens = rng.randint(0, V // 4, size=(3, prompt_len + generated)).astype(np.int32)  # a small range: repeats
    params = SamplingParams(repetition_penalty=repetition, repetition_context=context, presence_penalty=presence,
                            frequency_penalty=frequency, logit_bias=bias)
    ours = np.array(Sampler(params).process(mx.array(logits), History(mx.array(tokens), prompt_len)))
    assert np.allclose(ours, reference(logits, tokens, prompt_len, params), atol=1e-4)


def test_no_parameters_no_processors_and_the_history_is_required_otherwise():
    assert Sampler(SamplingParams(temperature=0.7, top_k=5)).processors == []
    sampler = Sampler(SamplingParams(presence_penalty=0.5))
    assert sampler.needs_history and sampler.start_history(mx.array([[1, 2]])).start == 2
    with pytest.raises(ValueError, match="History"):
        sampler.sample(mx.zeros((1, V)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logit_bias_forces_and_bans_a_token_in_every_strategy(tiny, strategy):
    engine = Engine(tiny, strategy, **({"n": 2} if strategy in ("best-of-n", "vote") else {}))
    forced = engine.generate(["hi", "longer prompt"], chat_template=False, max_tokens=5, ignore_eos=True, logit_bias={100: 100}, seed=0)
    assert [r.token_ids for r in forced] == [(100,) * 5] * 2
    plain = Engine(tiny, "greedy").generate("hi", chat_template=False, max_tokens=3, ignore_eos=True)
    first = plain.token_ids[0]
    banned = Engine(tiny, "greedy").generate("hi", chat_template=False, max_tokens=3, ignore_eos=True, logit_bias={first: -100})
    assert first not in banned.token_ids


def test_penalties_give_the_same_tokens_batched_alone_and_speculative():
    """Each batch row keeps its own history (rows of different prompts and lengths); speculative
    applies the processors at every verified position, so its greedy output is the loop's."""
    target = sharp_model(0)
    prompts = ["abc", "a much longer prompt", "z"]
    kwargs = dict(chat_template=False, max_tokens=12, ignore_eos=True)
    penalised = dict(frequency_penalty=3.0, presence_penalty=2.0, repetition_penalty=1.3)
    alone = [Engine(target, "greedy").generate(p, **kwargs, **penalised) for p in prompts]
    unpenalised = [Engine(target, "greedy").generate(p, **kwargs) for p in prompts]
    assert [r.token_ids for r in alone] != [r.token_ids for r in unpenalised]  # the penalties changed something
    batch = Engine(target, "batch").generate(prompts, **kwargs, **penalised)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    speculative = Engine(target, "speculative", draft="lookup:1").generate(prompts, **kwargs, **penalised)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in alone]
    assert sum(r.extra["drafted"] for r in speculative) > 0  # drafts were verified under the processors


PLUGIN = '''
"""A third-party plugin: a logits processor that bans every token id from `LIMIT` on (non-ASCII bytes)."""
import mlx.core as mx

from stratlm.core.hookspecs import hookimpl

LIMIT = 128


def floor(params):
    def process(history, logits):
        return mx.where(mx.arange(logits.shape[-1]) >= LIMIT, -mx.inf, logits)
    return process


@hookimpl
def register_logits_processors(register):
    register("floor", floor)
'''


def test_a_plugins_logits_processor_applies_in_every_strategy(tmp_path, monkeypatch, tiny):
    write_plugin_distribution(tmp_path, "stratlm-floor", {"stratlm_floor": PLUGIN}, {"floor": "stratlm_floor"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stratlm_floor", raising=False)
    registry = Registry()
    assert registry.failed == {} and registry.table("logits processor")["floor"].origin == "stratlm-floor"
    assert {"repetition_penalty", "presence_frequency_penalty", "logit_bias"} <= set(registry.names("logits processor"))
    plain = Engine(tiny, "greedy").generate("hi", chat_template=False, max_tokens=8, ignore_eos=True)
    assert max(plain.token_ids) >= 128  # without the plugin, high ids do come out
    for strategy in STRATEGIES:
        result = Engine(tiny, strategy, registry=registry).generate("hi", chat_template=False, max_tokens=8, ignore_eos=True, seed=0)
        assert max(result.token_ids) < 128, strategy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"presence_penalty": float("nan")}, "presence_penalty must be a finite number"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty must be a finite number"),
        ({"logit_bias": {"5": 1.0}}, r"logit_bias keys must be token ids \(ints >= 0\), got '5'"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {5: 101}}, r"logit_bias values must be numbers in \[-100, 100\], got 101 for token 5"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias values must be numbers"),
        ({"logit_bias": [5]}, "logit_bias must be a dict of token id -> bias"),
    ],
)
def test_bad_processor_parameters_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_params(**kwargs)


def test_a_bias_beyond_the_vocabulary_names_its_size(tiny):
    with pytest.raises(ConfigError, match="logit_bias names token 5000, but this model's vocabulary has 259 tokens"):
        Engine(tiny, "greedy").generate("hi", chat_template=False, max_tokens=2, logit_bias={5000: 1.0})
