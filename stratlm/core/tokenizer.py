"""Tokenizer: a Hugging Face fast tokenizer plus what generation needs (EOS ids, chat
template, streaming detokenization). Built from a model folder, or from GGUF metadata
without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, ModelLoadError


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


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int] = (), chat_template: str | None = None):
        self.hf = hf_tokenizer
        if chat_template and not getattr(hf_tokenizer, "chat_template", None):
            hf_tokenizer.chat_template = chat_template
        # transformers' decode converts the ids one by one in Python first (~50 us a call, per token
        # and row while streaming); the Rust tokenizer's decode is the same text unless
        # transformers is to clean up spaces afterwards
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None and not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False) else None
        ids = set(int(i) for i in eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(ids)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}. A model folder needs tokenizer.json (or tokenizer_config.json and vocabulary files)") from exc
        if len(hf) <= 1:  # transformers builds an empty tokenizer from config.json alone
            raise ModelLoadError(f"cannot load a tokenizer from {path}: no vocabulary found. A model folder needs tokenizer.json (or tokenizer_config.json and vocabulary files)")
        return cls(hf, eos_token_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
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
            rust.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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
        return cls(hf, [int(e.item() if hasattr(e, "item") else e) for e in ends if e is not None])

    # -- use -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if self._decode is not None:
            return self._decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.has_chat_template:
            raise ConfigError("this model has no chat template; pass a plain prompt (CLI: --no-chat-template)")
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    def save(self, out: str | Path) -> None:
        self.hf.save_pretrained(str(out))


class StreamingDetokenizer:
    """Turns tokens into text pieces as they arrive; never emits half a multi-byte character.

    The pieces always join to decode(all tokens): each piece is the growth of the decoded
    text, held back while the text ends in an incomplete UTF-8 sequence (U+FFFD). Each step
    decodes a short window, not the whole sequence (a batch of 64 rows spent ~8 ms a step
    re-decoding 256-token outputs): the tokens since the piece before last, so the window
    starts at a character boundary and keeps the context that tokenizers which strip a
    leading space need. The window grows only while text is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._start = 0  # window start: where the piece before last ended
        self._done = 0  # tokens already shown as text
        self._shown_in_window = ""  # decode(tokens[_start:_done])

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens[self._start :])
        if text.endswith("\ufffd") or not text.startswith(self._shown_in_window):
            return ""
        piece = text[len(self._shown_in_window) :]
        self.text += piece
        self._start, self._done = self._done, len(self.tokens)
        self._shown_in_window = self.tokenizer.decode(self.tokens[self._start : self._done])
        return piece

    def finish(self) -> str:
        """Whatever was held back (a genuinely invalid byte sequence at the very end)."""
        text = self.tokenizer.decode(self.tokens)
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return piece
