"""SentencePiece-style GGUF tokenizers (`tokenizer.ggml.model = "llama"`, as Llama 2, Mistral,
Gemma and Phi-3 files are) against transformers' own GGUF tokenizer loading, on a small
vocabulary written here: scores and no merges (what llama.cpp's converter writes for Llama 2) and
given merges, byte fallback to <0xNN> for what the vocabulary lacks, control and user-defined
tokens, BOS as flagged, the space prefix; Gemma's and Phi-3's files as their families read them
(transformers picks their builders by `general.architecture`)."""

from __future__ import annotations

import numpy as np
import pytest

from stratlm.core.errors import ModelLoadError
from stratlm.loaders.gguf_file import read_gguf
from stratlm.loaders.gguf_tokenizer import gguf_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")  # transformers builds GGUF tokenizers only with torch installed

UNKNOWN, CONTROL, USER_DEFINED, BYTE = 2, 3, 4, 6
PIECES = ["▁t", "he", "▁the", "▁a", "in", "▁in", "er", "an", "nd", "and", "▁and", "on", "or", "en", "es", "is", "▁is", "at", "it", "▁it",
          "ll", "▁w", "or", "ld", "orld", "▁world", "▁H", "el", "lo", "llo", "ello", "▁Hello", "▁▁", "▁▁▁▁", "12", "123", "▁c", "af", "▁caf",
          "▁tok", "ok", "to", "en", "iz", "ize", "▁tokenize", "▁s", "pa", "ce", "ces", "▁spaces"]
CHARS = list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()[]#*/_=\"<>|")
SPECIALS = [("[INST]", CONTROL), ("[/INST]", CONTROL), ("<think>", USER_DEFINED), ("</think>", USER_DEFINED)]
TEXTS = [
    "Hello the world and then 12345 or 3.14159, in 2024!",
    "  leading spaces,    runs\t\ttabs\n\n\nnewlines  ",
    "unicode: héllo wörld — naïve café; 日本語; emoji 🎉👩‍👩‍👧 🇫🇷",
    "def f(x):\n    return x**2  # the square\n",
    "[INST] tokenize this [/INST]<think>I'm thinking</think> they've DON'T</s>",
    "<s>bos in the text, and <unk> too",
    " ",
    "",
]


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    seen = set(tokens)
    for piece in CHARS + PIECES:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(1)
    for text, kind in SPECIALS:
        tokens.append(text)
        types.append(kind)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    # SentencePiece scores: longer merged pieces rank by their own order; single characters low
    for i, t in enumerate(tokens):
        if i >= 259 and len(t) == 1:
            scores[i] = -1000.0 - i
    return tokens, scores, types


def write_vocab_gguf(path, *, merges: bool, add_bos: bool | None = None, add_space_prefix: bool | None = None, arch: str = "llama",
                     vocab: tuple[list[str], list[float], list[int]] | None = None, special_ids: tuple[int, int, int] = (1, 2, 0)) -> list[str]:
    tokens, scores, types = vocab or vocabulary()
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("context_length", 64), ("embedding_length", 32), ("block_count", 1), ("feed_forward_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if merges:
        from stratlm.loaders.gguf_tokenizer import merges_from_scores

        w.add_token_merges([f"{a} {b}" for a, b in merges_from_scores(tokens, scores)][::2])  # a different set than the scores imply
    bos, eos, unk = special_ids
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.mark.parametrize("merges,add_bos", [(False, None), (True, None), (False, False)], ids=["scores", "merges", "no-bos"])
def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path, merges, add_bos):
    path = tmp_path / "spm.gguf"
    tokens = write_vocab_gguf(path, merges=merges, add_bos=add_bos)
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = gguf_tokenizer(read_gguf(path).metadata)
    for text in TEXTS:
        theirs = oracle.encode(text)
        assert ours.encode(text) == theirs, text
        assert ours.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False), text
        assert ours.decode(theirs) == oracle.decode(theirs), text
        if not text.startswith(" "):  # (a leading space is taken as the prefix "▁", as SentencePiece does)
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text, text  # byte fallback round trips
    assert (ours.encode("hi")[0] == 1) == (add_bos is not False)
    cafe = ours.encode("café", add_special_tokens=False)
    assert tokens.index("<0xC3>") in cafe and tokens.index("<0xA9>") in cafe  # é is not in the vocabulary
    if not merges:  # (the file's merges are every other one the scores imply)
        assert ours.encode("Hello", add_special_tokens=False) == [tokens.index("▁Hello")]
    assert ours.encode("[INST]", add_special_tokens=False) == [tokens.index("[INST]")]
    assert ours.encode("<think>", add_special_tokens=False) == [tokens.index("<think>")]
    assert ours.eos_token_ids == {2}


def test_space_prefix_off_and_missing_scores(tmp_path):
    path = tmp_path / "noprefix.gguf"
    tokens = write_vocab_gguf(path, merges=False, add_space_prefix=False)
    meta = read_gguf(path).metadata
    ours = gguf_tokenizer(meta)
    assert ours.encode("the", add_special_tokens=False)[0] != tokens.index("▁t")  # no "▁" before the text
    assert ours.decode(ours.encode("the world", add_special_tokens=False)) == "the world"
    broken = dict(meta)
    del broken["tokenizer.ggml.scores"]
    with pytest.raises(ModelLoadError, match="needs tokenizer.ggml.merges or one tokenizer.ggml.scores value per token"):
        gguf_tokenizer(broken)
    with pytest.raises(ModelLoadError, match="GGUF tokenizer model 'bert' is not supported; supported: 'gpt2', 'llama'"):
        gguf_tokenizer({**meta, "tokenizer.ggml.model": "bert"})


# Gemma's vocabulary: its specials first, whitespace runs (llama.cpp writes "  " as the spaces
# themselves) and newlines as user-defined tokens, turn markers as control tokens; scores that do
# not follow the tokens' order (transformers ranks Gemma's merges by position, not score)
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
GEMMA_WHITESPACE = ["\n", "\n\n", "\t", "  ", "   ", "    ", "\n  "]
GEMMA_TEXTS = TEXTS + ["<start_of_turn>user\nHi  there,   the    world\n\n<end_of_turn>\n", "  two  spaces\n  indented", "a\n\nb\t\tc", "\n  x"]


def gemma_vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + GEMMA_WHITESPACE
    types = [CONTROL] * 5 + [BYTE] * 256 + [USER_DEFINED] * len(GEMMA_WHITESPACE)
    for piece in CHARS + PIECES:
        if piece not in tokens and (piece.strip("▁") or piece == "▁"):  # runs of spaces are the whitespace tokens above
            tokens.append(piece)
            types.append(1)
    tokens += ["<start_of_turn>", "<end_of_turn>"]
    types += [CONTROL, CONTROL]
    scores = list(np.random.default_rng(0).normal(size=len(tokens)))  # unrelated to the order
    return tokens, scores, types


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_gemma_and_phi3_files_read_as_transformers_reads_them(tmp_path, arch):
    """The family's GGUF tokenizer (what the loader builds for that architecture) on a Gemma-style
    vocabulary (no space prefix, whitespace tokens, merges by position) and Phi-3's (the prefix
    from a normalizer: text after a special token, or starting with a space, gets its own "▁")."""
    from stratlm.core.registry import get_registry
    from stratlm.loaders.gguf import family_for_gguf, model_tokenizer

    path = tmp_path / f"{arch}.gguf"
    if arch == "gemma3":
        tokens = write_vocab_gguf(path, merges=False, arch=arch, add_space_prefix=False, vocab=gemma_vocabulary(), special_ids=(2, 1, 3))
        texts = GEMMA_TEXTS
    else:
        tokens = write_vocab_gguf(path, merges=False, arch=arch)
        texts = TEXTS + [" lead", "[INST] after a special [/INST] and more"]
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    meta = read_gguf(path).metadata
    ours = model_tokenizer(path, family_for_gguf(arch, get_registry(), path.name), meta)
    for text in texts:
        theirs = oracle.encode(text)
        assert ours.encode(text) == theirs, text
        assert ours.decode(theirs) == oracle.decode(theirs), text
    if arch == "gemma3":
        assert ours.encode("a  b", add_special_tokens=False) == [tokens.index("a"), tokens.index("  "), tokens.index("b")]  # as "▁▁"
        assert ours.encode("<start_of_turn>", add_special_tokens=False) == [tokens.index("<start_of_turn>")]
        assert ours.encode("hi")[0] == tokens.index("<bos>")
    plain = gguf_tokenizer(meta)  # the family's reading is not the plain one: the comparisons above tell them apart
    assert sum(plain.encode(t) != ours.encode(t) for t in texts) >= 3
