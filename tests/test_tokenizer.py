"""Streaming detokenization and stop strings.

The streamed pieces must join to exactly the final text and never show half of a multi-byte
character; text that may be the start of a stop string is held back and the final text is cut
exactly where the first stop string begins.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stratlm.decoding.detokenizer import StreamingDetokenizer
from stratlm.decoding.completion import Completion
from stratlm.core.types import GenerationParams
from stratlm.testing import byte_tokenizer

BYTES = byte_tokenizer()
EOS = frozenset({258})
REPLACEMENT = "\ufffd"


def stream(tokenizer, ids):
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.finish()


def test_byte_tokenizer_ids_are_the_utf8_bytes():
    text = "añ日🎉"
    assert BYTES.encode(text) == list(text.encode("utf-8"))
    assert BYTES.decode(BYTES.encode(text)) == text


@settings(max_examples=50)
@given(st.text(max_size=30))
def test_streamed_pieces_join_to_the_text_and_never_split_a_character(text):
    pieces, rest = stream(BYTES, BYTES.encode(text))  # one byte per token: every split point is tried
    assert "".join(pieces) + rest == text
    assert rest == ""
    assert all(REPLACEMENT not in p for p in pieces) or REPLACEMENT in text


@settings(max_examples=50)
@given(st.lists(st.integers(0, 255), max_size=30))
def test_arbitrary_bytes_stream_to_the_lossy_decoding(ids):
    """Invalid UTF-8 (a model can emit any bytes) still streams to exactly decode(ids)."""
    pieces, rest = stream(BYTES, ids)
    assert "".join(pieces) + rest == BYTES.decode(ids)


@pytest.mark.slow
@settings(max_examples=40)
@given(text=st.text(st.characters(codec="utf-8"), max_size=60), extra=st.lists(st.integers(0, 49151), max_size=12))
def test_smollm2_streaming_joins_to_decode(smollm2, text, extra):
    """Real BPE tokens (multi-byte pieces, emoji split across tokens) plus arbitrary vocabulary ids."""
    tok = smollm2.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    pieces, rest = stream(tok, ids)
    decoded = tok.decode(ids)  # == text, less bytes the vocabulary lacks (e.g. "\x1d")
    assert "".join(pieces) + rest == decoded
    assert all(REPLACEMENT not in p for p in pieces) or REPLACEMENT in decoded
    pieces, rest = stream(tok, ids + extra)
    assert "".join(pieces) + rest == tok.decode(ids + extra)


# -- Completion: EOS, max_tokens, stop strings ----------------------------------------------------
def complete(text: str, **params):
    completion = Completion(BYTES, GenerationParams(**params), EOS)
    pieces = []
    for token in BYTES.encode(text) + [258]:
        pieces.append(completion.add(token))
        if completion.finished:
            break
    return completion, pieces


def test_stop_string_is_held_back_then_cut():
    completion, pieces = complete("abc END more", stop=("END",))
    assert completion.text == "abc " and completion.finish_reason == "stop"
    assert "".join(pieces) == "abc "
    assert pieces[4:6] == ["", ""]  # "E", "N": could be the start of "END", held back
    assert completion.tokens == BYTES.encode("abc END")  # tokens up to where the stop was seen


def test_partial_stop_match_is_released_when_it_fails():
    completion, pieces = complete("xENy ENDz", stop=("END",))
    assert pieces[:4] == ["x", "", "", "ENy"]
    assert completion.text == "xENy "


def test_earliest_of_several_stop_strings_wins():
    completion, _ = complete("one two three", stop=("three", "two", "e t"))
    assert completion.text == "on"  # "e t" starts at 2, before "two" (4) and "three" (8)


def test_stop_string_across_a_multibyte_character():
    completion, pieces = complete("日本語です", stop=("語",))
    assert completion.text == "日本" and "".join(pieces) == "日本"


def test_eos_ends_without_text_and_max_tokens_gives_length():
    completion, pieces = complete("hi")
    assert completion.text == "hi" and completion.finish_reason == "stop" and 258 not in completion.tokens
    assert completion.generated == 3  # EOS counts as work done, not as output
    completion, pieces = complete("hello", max_tokens=3)
    assert completion.text == "hel" and completion.finish_reason == "length"
    completion = Completion(BYTES, GenerationParams(ignore_eos=True, max_tokens=2), EOS)
    completion.add(258)
    assert not completion.finished


def first_stop_cut(text: str, stops: list[str]) -> str:
    """Generation ends at the first character that completes a stop string (a longer one that
    would have started earlier is never generated), cut where the earliest stop seen so far starts."""
    for end in range(1, len(text) + 1):
        seen = [text.find(s, 0, end) for s in stops if s in text[:end]]
        if seen:
            return text[: min(seen)]
    return text


@example(text="AbA", stops=["b", "AbA"])  # "b" ends first: "AbA" is never generated
@given(text=st.text(st.sampled_from("abAB日 \n"), max_size=30), stops=st.lists(st.text(st.sampled_from("abAB日 \n"), min_size=1, max_size=4), max_size=3))
def test_stop_strings_cut_exactly_and_pieces_join(text, stops):
    completion, pieces = complete(text, stop=tuple(stops), max_tokens=1000)
    expected = first_stop_cut(text, stops)
    assert completion.text == expected
    assert "".join(pieces) == expected
    assert completion.finish_reason == "stop"
    shown = ""
    for piece in pieces:  # nothing past the cut is ever shown, even transiently
        shown += piece
        assert expected.startswith(shown)


@settings(max_examples=50)
@given(ids=st.lists(st.integers(0, 258), max_size=30), max_tokens=st.integers(1, 40), stop=st.sampled_from([(), ("ab",)]))
def test_a_completion_that_is_not_streamed_ends_with_the_same_result(ids, max_tokens, stop):
    """stream=False decodes once at the end (unless stop strings need the text as it grows)."""
    outcomes = []
    for stream in (True, False):
        completion = Completion(BYTES, GenerationParams(max_tokens=max_tokens, stop=stop), EOS, stream=stream)
        for token in ids + [258]:  # rows always end: EOS at the latest
            completion.add(token)
            if completion.finished:
                break
        outcomes.append((completion.text, completion.tokens, completion.finish_reason, completion.generated))
    assert outcomes[0] == outcomes[1]
