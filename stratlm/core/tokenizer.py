"""Tokenizer: a Hugging Face fast tokenizer plus what generation needs (EOS ids, chat
template, streaming detokenization). Built from a model folder, or from GGUF metadata
without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, ModelLoadError


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int] = (), chat_template: str | None = None):
        self.hf = hf_tokenizer
        if chat_template and not getattr(hf_tokenizer, "chat_template", None):
            hf_tokenizer.chat_template = chat_template
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
        return cls(hf, eos_token_ids)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Byte-level BPE from the GGUF vocabulary and merges; same ids as transformers' GGUF loader."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer
        from transformers import PreTrainedTokenizerFast

        kind = str(meta.get("tokenizer.ggml.model", ""))
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
        rust = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        rust.decoder = decoders.ByteLevel()
        rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

        def token(key: str) -> str | None:
            value = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[int(value.item() if hasattr(value, "item") else value)] if value is not None else None

        hf = PreTrainedTokenizerFast(
            tokenizer_object=rust,
            bos_token=token("bos"),
            eos_token=token("eos"),
            unk_token=token("unknown"),
            pad_token=token("padding"),
            chat_template=meta.get("tokenizer.chat_template"),
        )
        return cls(hf)

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
    text, held back while the text ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece

    def finish(self) -> str:
        """Whatever was held back (a genuinely invalid byte sequence at the very end)."""
        text = self.tokenizer.decode(self.tokens)
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return piece
