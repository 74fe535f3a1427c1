"""A GGUF file's tokenizer built from its vocabulary and merges (no torch): the default a
family's GGUFSpec.tokenizer replaces."""

from __future__ import annotations

from typing import Any

from stratlm.core.errors import ModelLoadError
from stratlm.core.tokenizer import Tokenizer

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: llama.cpp's `tokenizer.ggml.pre` names -> the split regex the merges were learned with (else GPT-2's)
GGUF_PRE_TOKENIZER_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer `tokenizer.ggml.model` names: "gpt2" (byte-level BPE) or "llama" (SentencePiece)."""
    kind = str(meta.get("tokenizer.ggml.model", ""))
    builders = {"gpt2": bpe_tokenizer}
    if kind not in builders:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: {', '.join(repr(k) for k in builders)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError("the GGUF has no valid tokenizer.ggml.tokens (a non-empty list of strings)")
    return builders[kind](meta)


def bpe_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary and merges; same ids as transformers' GGUF loader.

    The pre-tokenizer split follows `tokenizer.ggml.pre` as llama.cpp does; control tokens
    become special tokens, user-defined ones (Qwen3's <think>) plain added tokens, and BOS is
    prepended when `tokenizer.ggml.add_bos_token` says so.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    kind = str(meta.get("tokenizer.ggml.model", ""))
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = meta.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else (types.tolist() if hasattr(types, "tolist") else list(types))  # tolist: 2 s faster than iterating
    rust = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = GGUF_PRE_TOKENIZER_SPLITS.get(str(meta.get("tokenizer.ggml.pre", "")))
    if split is None:
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])
    rust.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED])

    def token(key: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(value.item() if hasattr(value, "item") else value)] if value is not None else None

    bos = token("bos")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if bos is not None and add_bos is not None and bool(add_bos.item() if hasattr(add_bos, "item") else add_bos):
        bos_id = tokens.index(bos)
        rust.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=rust,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    # llama.cpp stops on every end-of-generation token: Llama 3 files name <|eot_id|> apart from EOS
    ends = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
    return Tokenizer(hf, [int(e.item() if hasattr(e, "item") else e) for e in ends if e is not None])
