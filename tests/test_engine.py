"""The public API: Engine over a tiny random model and over the real embedded SmolLM2."""

import pytest

from stratlm import Engine, GenerationResult
from stratlm.core.errors import ConfigError
from stratlm.testing import tiny_model


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model("llama", seed=1))


def test_generate_a_string_applies_the_chat_template(engine):
    result = engine.generate("hello", max_tokens=8)
    assert isinstance(result, GenerationResult)
    assert result.prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert 0 < len(result.token_ids) <= 8
    assert result.text == engine.tokenizer.decode(result.token_ids)
    assert result.finish_reason in ("stop", "length")
    assert result.stats.prompt_tokens == len(engine.tokenizer.encode(result.prompt, add_special_tokens=False))


def test_plain_prompt_without_template_and_chat_messages(engine):
    plain = engine.generate("hello", max_tokens=4, chat_template=False)
    assert plain.prompt == "hello"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = engine.generate(messages, max_tokens=4)
    assert chat.prompt.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_a_list_of_prompts_gives_a_list_of_results_equal_to_one_by_one(engine):
    prompts = ["a", "bcd", "efghij"]
    together = engine.generate(prompts, max_tokens=6)
    alone = [engine.generate(p, max_tokens=6) for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_stream_pieces_join_to_the_final_text(engine):
    pieces = list(engine.stream("tell me", max_tokens=12, ignore_eos=True))
    result = engine.last_result
    assert "".join(pieces) == result.text
    assert len(result.token_ids) == 12 and result.finish_reason == "length"


def test_stop_string_cuts_the_text_and_finishes():
    engine = Engine(tiny_model("llama", seed=1))
    free = engine.generate("x", max_tokens=12, ignore_eos=True)
    stop = free.text[3:5]
    assert stop, "the tiny model must produce some text"
    cut = engine.generate("x", max_tokens=12, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    streamed = "".join(engine.stream("x", max_tokens=12, ignore_eos=True, stop=[stop]))
    assert streamed == cut.text


def test_bad_input_is_a_clear_error(engine):
    with pytest.raises(ConfigError, match="max_tokens must be a positive integer"):
        engine.generate("hi", max_tokens=0)
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        engine.generate("hi", temperature=-0.5)
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        engine.generate("hi", top_p=0)
    with pytest.raises(ConfigError, match="prompt is empty"):
        engine.generate("")
    with pytest.raises(ConfigError, match="prompt list is empty"):
        engine.generate([])
    with pytest.raises(ConfigError, match="does not take option"):
        Engine(engine.loaded, strategy="greedy", n=3)


def test_a_prompt_longer_than_the_context_is_refused():
    engine = Engine(tiny_model("llama", seed=0, max_position_embeddings=16))
    with pytest.raises(ConfigError, match="this model's context is 16 tokens"):
        engine.generate("a much longer prompt than sixteen tokens", chat_template=False)


def test_sampling_is_deterministic_for_a_seed(engine):
    sampler = Engine(engine.loaded, strategy="sample")
    a = sampler.generate("hi", max_tokens=10, seed=7, ignore_eos=True)
    b = sampler.generate("hi", max_tokens=10, seed=7, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_the_embedded_model_answers_a_chat_prompt(smollm2):
    engine = Engine(smollm2)
    result = engine.generate("What is the capital of France?", max_tokens=20)
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"  # stopped on <|im_end|>, which is not in the text
    assert result.stats.generation_tokens == len(result.token_ids)  # EOS sampled, first token counted as prefill


def test_chat_template_kwargs_reach_the_template():
    # a Qwen3-style switch: the template emits an empty think block when thinking is off
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    )
    loaded = tiny_model("qwen3", seed=0)
    loaded.tokenizer.hf.chat_template = template
    engine = Engine(loaded)
    thinking = engine.generate("hi", max_tokens=2)
    quiet = engine.generate("hi", max_tokens=2, chat_template_kwargs={"enable_thinking": False})
    assert "<think>" not in thinking.prompt
    assert quiet.prompt.endswith("<think>\n\n</think>\n\n")


def test_a_sliding_window_model_runs_past_its_window():
    # the window is applied (a rotating cache): prompts and generations longer than it are exact
    # (tests/test_families_oracle.py checks the logits against transformers)
    windowed = Engine(tiny_model("mistral", seed=0, sliding_window=8, max_position_embeddings=64))
    assert windowed.loaded.context_length == 64
    result = windowed.generate("twelve bytes", chat_template=False, max_tokens=12, ignore_eos=True)
    assert len(result.token_ids) == 12
    unused = Engine(tiny_model("qwen3", seed=0, sliding_window=8, use_sliding_window=False, max_position_embeddings=64))
    assert unused.loaded.context_length == 64
