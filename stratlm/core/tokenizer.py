"""Tokenizer: a Hugging Face fast tokenizer plus what generation needs (EOS ids, chat template,
a fast decode). Built from a model folder here; loaders build it from other formats (GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, ModelLoadError


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
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}. "
                                 "A model folder needs tokenizer.json (or tokenizer_config.json and vocabulary files)") from exc
        if len(hf) <= 1:  # transformers builds an empty tokenizer from config.json alone
            raise ModelLoadError(f"cannot load a tokenizer from {path}: no vocabulary found. "
                                 "A model folder needs tokenizer.json (or tokenizer_config.json and vocabulary files)")
        return cls(hf, eos_token_ids)

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

    def save(self, out: str | Path) -> None:
        self.hf.save_pretrained(str(out))
