"""A GGUF file's tokenizer built from its vocabulary and merges (no torch): the default a
family's GGUFSpec.tokenizer replaces."""

from __future__ import annotations

from typing import Any

from stratlm.core.errors import ModelLoadError
from stratlm.core.tokenizer import Tokenizer

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Mistral's Tekken (Mistral Nemo, Small 3): cased words split at their capitals
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                 r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: llama.cpp's `tokenizer.ggml.pre` names -> the split regex the merges were learned with (else
#: GPT-2's); the names transformers' GGUF loader knows, for the architectures stratlm reads
GGUF_PRE_TOKENIZER_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer `tokenizer.ggml.model` names: "gpt2" (byte-level BPE) or "llama" (SentencePiece)."""
    kind = str(meta.get("tokenizer.ggml.model", ""))
    builders = {"gpt2": bpe_tokenizer, "llama": sentencepiece_tokenizer}
    if kind not in builders:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: {', '.join(repr(k) for k in builders)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError("the GGUF has no valid tokenizer.ggml.tokens (a non-empty list of strings)")
    return builders[kind](meta)


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    return default if value is None else bool(value.item() if hasattr(value, "item") else value)


def token_types(meta: dict[str, Any], n: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    return [1] * n if types is None else (types.tolist() if hasattr(types, "tolist") else list(types))  # tolist: 2 s faster than iterating


def bpe_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary and merges; same ids as transformers' GGUF loader.

    The pre-tokenizer split follows `tokenizer.ggml.pre` as llama.cpp does; control tokens
    become special tokens, user-defined ones (Qwen3's <think>) plain added tokens, and BOS is
    prepended when `tokenizer.ggml.add_bos_token` says so.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    kind = str(meta.get("tokenizer.ggml.model", ""))
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not byte-level BPE ('gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    rust = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = GGUF_PRE_TOKENIZER_SPLITS.get(str(meta.get("tokenizer.ggml.pre", "")))
    if split is None:
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    rust.decoder = decoders.ByteLevel()
    return _finish(rust, meta, tokens, add_bos_default=False)


def sentencepiece_tokenizer(meta: dict[str, Any], *, prefix_every_segment: bool = False) -> Tokenizer:
    """SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, TinyLlama files),
    built as transformers' GGUF loader builds it (its LlamaTokenizer): the vocabulary with byte
    fallback to the <0xNN> tokens, no normalizer, "▁" for spaces and one "▁" before the text
    (unless `tokenizer.ggml.add_space_prefix` is false), merges from the file or, when it has
    none, recovered from the vocabulary ranked by the tokens' scores. BOS is added unless
    `tokenizer.ggml.add_bos_token` is false (llama.cpp's default for these vocabularies).

    `prefix_every_segment`: the "▁" prefix comes from a normalizer instead (Phi-3's tokenizer.json,
    which transformers rebuilds for phi3 files): every run of text between special tokens gets
    one, even a run that already starts with a space."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError("a SentencePiece GGUF tokenizer needs tokenizer.ggml.merges or one tokenizer.ggml.scores value per token")
        merges = merges_from_scores(tokens, [float(x) for x in scores])
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
    if prefix_every_segment:
        rust.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    rust.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return _finish(rust, meta, tokens, add_bos_default=True)


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best score first (transformers' generate_merges: ties by the pieces' lengths, then ids)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _finish(rust: Any, meta: dict[str, Any], tokens: list[str], add_bos_default: bool) -> Tokenizer:
    """Special and added tokens, BOS/EOS post-processing, the chat template, end-of-turn ids."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    types = token_types(meta, len(tokens))
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])
    rust.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED])

    def token(key: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(value.item() if hasattr(value, "item") else value)] if value is not None else None

    bos, eos = token("bos"), token("eos")
    add_bos = bos is not None and _flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = eos is not None and _flag(meta, "tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:
        first, last = ([f"{bos}"] if add_bos else []), ([f"{eos}"] if add_eos else [])
        specials = sorted({(t, tokens.index(t)) for t in first + last})
        rust.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last), pair=" ".join(first + ["$A"] + last + first + ["$B"] + last), special_tokens=specials)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=rust,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    # llama.cpp stops on every end-of-generation token: Llama 3 files name <|eot_id|> apart from EOS
    ends = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
    return Tokenizer(hf, [int(e.item() if hasattr(e, "item") else e) for e in ends if e is not None])
