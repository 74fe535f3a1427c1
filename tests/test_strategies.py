"""The strategies by example: batch rows and streaming, best-of-n scoring, vote counting,
speculative sampling's distribution (chi-square), the real SmolLM2, and bad input."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import mlx.core as mx
import pytest
from strategy_models import assert_same_greedy, sharp_model, sharpen

from stratlm.cli.main import main
from stratlm.engine import Engine
from stratlm.core.errors import ConfigError, UnknownNameError
from stratlm.loaders.loading import save_model
from stratlm.decoding.sampler import Sampler
from stratlm.core.types import GenerationParams, GenerationResult, SamplingParams
from stratlm.strategies.best_of_n import BestOfN
from stratlm.strategies.speculative import LookupDraft, ModelDraft, SpeculativeCounts, speculative_decode
from stratlm.strategies.vote import Vote, boxed, last_number, whole_text
from stratlm.testing import byte_tokenizer, tiny_model


def teacher_forced_logprobs(loaded, prompt: list[int], tokens: list[int]) -> list[float]:
    logits = loaded.model(mx.array([prompt + tokens]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def candidate(text: str, logprobs: list[float]) -> GenerationResult:
    return GenerationResult(text=text, token_ids=list(range(len(logprobs))), finish_reason="stop", logprobs=tuple(logprobs))


# -- batch --------------------------------------------------------------------------------------
def test_batch_rows_stop_on_their_own_stop_strings_and_stream_joins_to_the_text():
    target = sharp_model(0)
    engine = Engine(target, "batch")
    prompts = ["abc", "a much longer prompt", "z"]
    alone = [Engine(target, "greedy").generate(p, chat_template=False, max_tokens=16) for p in prompts]
    stop = alone[1].text[3:5]  # cuts row 1 after a few characters; other rows may or may not contain it
    batch = engine.generate(prompts, chat_template=False, max_tokens=16, stop=stop)
    for one, row in zip(alone, batch):
        cut = one.text.find(stop)
        assert row.text == (one.text[:cut] if cut != -1 else one.text)
        assert row.finish_reason == ("stop" if cut != -1 else "length")
        assert row.prompt in prompts
    assert batch[1].finish_reason == "stop"
    pieces = list(engine.stream("a much longer prompt", chat_template=False, max_tokens=16))
    assert "".join(pieces) == engine.last_result.text == alone[1].text


def test_batch_size_option_splits_the_batch_with_the_same_output():
    target = sharp_model(1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    params = GenerationParams(max_tokens=8)
    whole = Engine(target, "batch").strategy.generate(prompts, params)
    split = Engine(target, "batch", batch_size="3").strategy.generate(prompts, params)
    assert [r.token_ids for r in whole] == [r.token_ids for r in split]


@pytest.mark.slow
def test_batch_matches_greedy_on_smollm2(smollm2):
    prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea, please, in English."]
    greedy = Engine(smollm2, "greedy").generate(prompts, max_tokens=12)
    batch = Engine(smollm2, "batch").generate(prompts, max_tokens=12)
    engine = Engine(smollm2, "greedy")
    for prompt, one, row in zip(prompts, greedy, batch):
        assert_same_greedy(smollm2, engine.render(prompt)[1], row.token_ids, one.token_ids)
        assert row.stats.prompt_tokens == one.stats.prompt_tokens
    assert batch[0].text.startswith("The capital of France is Paris")


# -- best-of-n ------------------------------------------------------------------------------------
def test_mean_logprob_can_rank_differently_from_the_sum(tiny):
    short, long = candidate("short", [-1.0]), candidate("a longer one", [-0.5] * 4)
    params = GenerationParams()
    assert BestOfN(tiny, n=2, scorer="logprob").choose([short, long], params).text == "short"
    best = BestOfN(tiny, n=2, scorer="mean_logprob").choose([short, long], params)
    assert best.text == "a longer one"
    assert [c["score"] for c in best.extra["candidates"]] == [-1.0, -0.5]
    assert best.logprobs is None  # not asked for


def test_best_of_n_scores_are_the_models_logprobs_and_a_callable_reward_picks_the_best():
    target = sharpen(tiny_model("llama", seed=3), weight_scale=3.0, head_scale=2.0)  # soft enough to sample varied text
    engine = Engine(target, "best-of-n", n=6)
    kwargs = dict(chat_template=False, max_tokens=6, seed=7, logprobs=True)
    result = engine.generate("hello", **kwargs)
    scores = [c["score"] for c in result.extra["candidates"]]
    assert len(scores) == 6 and len({c["text"] for c in result.extra["candidates"]}) > 1
    assert result.extra["score"] == max(scores)
    prompt = engine.render("hello", chat_template=False)[1]
    assert sum(teacher_forced_logprobs(target, prompt, list(result.token_ids))) == pytest.approx(result.extra["score"], abs=1e-3)
    again = engine.generate("hello", **kwargs).extra  # deterministic for a seed (the prompt's keys now from the prefix cache: floats may move)
    assert [c["text"] for c in again["candidates"]] == [c["text"] for c in result.extra["candidates"]]
    assert [c["score"] for c in again["candidates"]] == pytest.approx(scores, abs=1e-4)

    def vowels(r: GenerationResult) -> float:
        return sum(ch in "aeiou" for ch in r.text)

    rewarded = Engine(target, "best-of-n", n=6, scorer=vowels).generate("hello", **kwargs)
    assert [c["text"] for c in rewarded.extra["candidates"]] == [c["text"] for c in result.extra["candidates"]]
    assert vowels(rewarded) == max(c["score"] for c in rewarded.extra["candidates"])
    assert rewarded.extra["scorer"] == "vowels"


# -- vote -----------------------------------------------------------------------------------------
def test_answer_extractors():
    assert last_number("so 3 apples and 1,250.50 pears") == "1250.5"
    assert last_number("-7.0 degrees") == "-7"
    assert last_number("no digits") is None
    assert boxed(r"thus \boxed{\frac{1}{2}} and \boxed{x^{2}}") == "x^{2}"
    assert boxed(r"\boxed{unclosed") is None
    assert whole_text("  The Answer IS\n42. ") == "the answer is 42"


def test_vote_counts_answers_and_breaks_ties_by_mean_logprob(tiny):
    samples = [
        candidate("I think 12", [-2.0, -2.0]),
        candidate("it is 7", [-0.1, -0.3]),
        candidate("12 it is", [-0.2]),
        candidate("maybe 7", [-1.0]),
        candidate("no idea", [-0.01]),
    ]
    result = Vote(tiny, n=5).choose(samples, GenerationParams())
    # 12 and 7 both have two votes; the best completion for 12 has mean logprob -0.2, for 7 -0.2 too: the answer string decides
    assert result.extra["votes"] == {"12": 2, "7": 2}
    assert (result.extra["answer"], result.extra["count"]) == ("12", 2)
    assert result.text == "12 it is"
    samples[1] = candidate("it is 7", [-0.1])
    result = Vote(tiny, n=5).choose(samples, GenerationParams())
    assert (result.extra["answer"], result.extra["count"], result.text) == ("7", 2, "it is 7")
    assert [s["answer"] for s in result.extra["samples"]] == ["12", "7", "12", "7", None]


def test_vote_runs_end_to_end_with_a_registered_extractor():
    target = sharpen(tiny_model("llama", seed=3), weight_scale=3.0, head_scale=2.0)
    result = Engine(target, "vote", n=8, extractor="text").generate("hello", chat_template=False, max_tokens=2, seed=1)
    assert sum(result.extra["votes"].values()) == sum(s["answer"] is not None for s in result.extra["samples"])
    assert result.extra["count"] == max(result.extra["votes"].values())
    assert whole_text(result.text) == result.extra["answer"]


# -- speculative ----------------------------------------------------------------------------------
def test_speculative_stats_with_a_perfect_draft():
    target = sharp_model(0)
    result = Engine(target, "speculative", draft=target, num_draft=3).generate("hi", chat_template=False, max_tokens=21, ignore_eos=True)
    assert result.extra["acceptance_rate"] == 1.0
    assert result.extra["tokens_per_target_forward"] == 4.0  # 3 drafts + the bonus token, 5 times
    assert result.extra["target_forwards"] == 5
    assert result.extra["draft_time"] > 0 and result.extra["target_time"] > 0
    assert result.stats.generation_tokens == 20


def chi_square_p_value(observed: Counter, expected: dict, runs: int) -> float:
    """Pearson's test; cells with expected count < 5 are pooled (rarest first)."""
    import torch

    obs, exp, o, e = [], [], 0, 0.0
    for cell in sorted(expected, key=expected.get):
        o, e = o + observed[cell], e + expected[cell] * runs
        if e >= 5:
            obs.append(o), exp.append(e)
            o, e = 0, 0.0
    obs[-1], exp[-1] = obs[-1] + o, exp[-1] + e
    statistic = sum((a - b) ** 2 / b for a, b in zip(obs, exp))
    df = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)).item()


def tiny_vocabulary_model(seed: int):
    loaded = tiny_model("llama", seed=seed, vocab_size=3, num_hidden_layers=1, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    return sharpen(loaded, weight_scale=1.0, head_scale=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("draft_kind, runs", [("model", 400), ("lookup", 300)])
def test_speculative_sampling_has_the_targets_distribution(draft_kind, runs):
    """Sequences of 4 tokens over a 3-token vocabulary: the frequencies must match the target's
    exact sequence probabilities. Accepting every draft, accepting with p instead of p/q (model
    draft), or resampling from p instead of max(0, p - q) each fail it (checked by mutation)."""
    target = tiny_vocabulary_model(0)
    prompt, length = [0, 1, 2, 0, 1], 4
    draft = ModelDraft(target, tiny_vocabulary_model(5)) if draft_kind == "model" else LookupDraft(2)
    exact = {}
    for sequence in itertools.product(range(3), repeat=length):
        exact[sequence] = math.exp(sum(teacher_forced_logprobs(target, prompt, list(sequence))))
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-4)
    observed, counts = Counter(), SpeculativeCounts()
    for run in range(runs):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=run))
        observed[tuple(token for token, _ in speculative_decode(target.model, prompt, sampler, draft, 2, length, counts))] += 1
    assert chi_square_p_value(observed, exact, runs) > 1e-3
    assert 0.2 < counts.accepted / counts.drafted < 0.9  # both acceptance and rejection were exercised


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, options, message",
    [
        ("best-of-n", {"n": 0}, "option n must be an integer >= 1, got 0"),
        ("vote", {"n": "many"}, "option n must be an integer >= 1, got 'many'"),
        ("speculative", {"num_draft": 0}, "option num_draft must be an integer >= 1"),
        ("batch", {"batch_size": 2.5}, "option batch_size must be an integer >= 1"),
        ("speculative", {"draft": "lookup:0"}, "draft='lookup:N'"),
        ("vote", {"scorer": "logprob"}, "does not take option(s) scorer; it accepts: n, extractor"),
        ("best-of-n", {"scorer": 3}, "option scorer must be a callable or the name of a registered scorer"),
    ],
)
def test_bad_options_name_the_option(tiny, strategy, options, message):
    with pytest.raises(ConfigError) as error:
        Engine(tiny, strategy, **options)
    assert message in str(error.value)


def test_unknown_scorer_extractor_and_draft_names(tiny):
    with pytest.raises(UnknownNameError, match="unknown scorer 'reward'.*logprob, mean_logprob"):
        Engine(tiny, "best-of-n", scorer="reward")
    with pytest.raises(UnknownNameError, match="unknown answer extractor 'box'. Did you mean 'boxed'"):
        Engine(tiny, "vote", extractor="box")
    with pytest.raises(UnknownNameError, match="unknown model 'no-such-draft'"):
        Engine(tiny, "speculative", draft="no-such-draft")


def test_draft_with_another_vocabulary_is_refused(tiny):
    with pytest.raises(ConfigError, match="vocabulary of 300 tokens, the target 'tiny-llama-0' has 259"):
        Engine(tiny, "speculative", draft=tiny_model("llama", seed=1, vocab_size=300))
    renamed = byte_tokenizer()
    renamed.hf.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="another tokenizer"):
        Engine(tiny, "speculative", draft=tiny_model("llama", seed=1).replace(tokenizer=renamed))


@pytest.mark.parametrize("strategy", ["batch", "best-of-n", "vote", "speculative"])
def test_empty_prompts_are_refused(tiny, strategy):
    engine = Engine(tiny, strategy)
    with pytest.raises(ConfigError, match="the prompt list is empty"):
        engine.strategy.generate([], GenerationParams())
    with pytest.raises(ConfigError, match="prompt 0 has no tokens"):
        engine.strategy.generate([[]], GenerationParams())


@pytest.mark.parametrize("option, message", [("n=0", "option n must be an integer >= 1, got 0"), ("scorer=logprob", "does not take option(s) scorer")])
def test_cli_prints_a_bad_option_as_one_line(tmp_path, tiny, capsys, option, message):
    folder = save_model(tiny, tmp_path / "tiny")
    assert main(["generate", "-m", str(folder), "-s", "vote", "-o", option, "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: strategy 'vote'") and message in err and err.count("\n") == 1
