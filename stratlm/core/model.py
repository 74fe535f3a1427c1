"""The Model interface, and the family descriptor a model plugin registers.

A model maps token ids (B, L) and a per-layer cache to logits (B, L, vocab). It exposes
its pieces - `embed`, `layers`, `head` - so transforms can reorder, drop or wrap blocks
and read hidden states without knowing the family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .tokenizer import Tokenizer


class Model(nn.Module):
    """Base class of every model family. Subclasses provide embed, layers and head."""

    #: Hugging Face style config (model_type, hidden_size, ...); saved as config.json.
    config: dict[str, Any]

    @property
    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def set_layers(self, blocks: list[nn.Module]) -> None:
        """Replace the blocks (and the config's layer count). A method, not a property setter:
        mlx's Module.__setattr__ takes list values itself and would bypass a setter."""
        raise NotImplementedError

    def embed(self, tokens: mx.array) -> mx.array:
        raise NotImplementedError

    def head(self, hidden: mx.array) -> mx.array:
        """Final norm and output projection: hidden (B, L, D) -> logits (B, L, vocab)."""
        raise NotImplementedError

    def optimize_for_inference(self) -> None:
        """Rearrange weights for faster inference, keeping parameter names and values (default: nothing)."""

    def compiled_decoding_pays(self) -> bool:
        """Whether decoding with the cache this model just made (make_cache) runs faster as one
        compiled step over a preallocated cache (decoding.loop.CompiledStep) than as the plain
        forward; used when STRATLM_COMPILE is not set. Default: no."""
        return False

    #: Whether the model applies its config's sliding window itself (a rotating cache, banded masks)
    sliding_window_attention: bool = False

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def make_cache(self, left_padding: Sequence[int] | None = None) -> list[KVCache]:
        return [KVCache(left_padding) for _ in self.layers]

    def attention_masks(self, n_new: int, cache: list[KVCache] | None) -> list[mx.array | str | None]:
        """One attention mask per layer for n_new positions (default: every layer alike, from the
        first layer's cache; a family with sliding-window layers gives those their own)."""
        return [attention_mask(n_new, cache[0] if cache else None)] * len(self.layers)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        hidden = self.embed(tokens)
        masks = self.attention_masks(tokens.shape[1], cache)
        for i, block in enumerate(self.layers):
            hidden = block(hidden, masks[i], cache[i] if cache else None)
        return self.head(hidden)

    def hidden_states(self, tokens: mx.array) -> list[mx.array]:
        """The residual stream entering each block, and leaving the last one (len = layers + 1)."""
        hidden = self.embed(tokens)
        masks = self.attention_masks(tokens.shape[1], None)
        states = [hidden]
        for block, mask in zip(self.layers, masks):
            hidden = block(hidden, mask, None)
            states.append(hidden)
        return states


def attention_mask(n_new: int, cache: KVCache | None) -> mx.array | str | None:
    if cache is not None:
        return cache.make_mask(n_new)
    return "causal" if n_new > 1 else None


@attrs.frozen(eq=False)
class GGUFSpec:
    """How a family reads a GGUF file (llama.cpp's layout), declared by the family so the GGUF
    loader knows no family by name.

    `architectures`: the `general.architecture` values it reads. `tensor_names`: llama.cpp's
    tensor base names -> the model's parameter paths; tensors of block N ("blk.N.<base>") go under
    `block_prefix.format(N)`. `config(metadata, tensors, model_type)`: the Hugging Face style
    config. `rope_scaling(factors, config, file_name)`: the config's `rope_scaling` from a
    `rope_freqs` tensor (None: such a file is refused). `unpermute_qk(tensors, config)`: undoes
    the converter's Q/K row permutation (None: rows as stored). `tokenizer(metadata)`: the
    tokenizer (None: the one `tokenizer.ggml.model` names, byte-level BPE or SentencePiece).
    """

    architectures: tuple[str, ...] = attrs.field(converter=tuple)
    tensor_names: dict[str, str]
    config: Callable[[dict[str, Any], dict[str, mx.array], str], dict[str, Any]]
    block_prefix: str = "model.layers.{}"
    rope_scaling: Callable[[mx.array, dict[str, Any], str], dict[str, Any]] | None = None
    unpermute_qk: Callable[[dict[str, mx.array], dict[str, Any]], dict[str, mx.array]] | None = None
    tokenizer: Callable[[dict[str, Any]], Tokenizer] | None = None

    def parameter_name(self, gguf_name: str) -> str:
        """A GGUF tensor name ("blk.3.attn_q.weight") -> the model's ("model.layers.3.self_attn.q_proj.weight")."""
        parts = gguf_name.split(".")
        if parts[0] == "blk":
            base, suffix = parts[2], ".".join(parts[3:])
            return f"{self.block_prefix.format(parts[1])}.{self.tensor_names.get(base, base)}.{suffix}"
        base, suffix = parts[0], ".".join(parts[1:])
        return f"{self.tensor_names.get(base, base)}.{suffix}"


@attrs.frozen(eq=False)
class ModelFamily:
    """What a model plugin registers: how to build a family's model from its config.

    `model_types` are Hugging Face `model_type` values; `gguf` says how the family's GGUF files
    read (None: the family has none).
    """

    name: str
    build: Callable[[dict[str, Any]], Model]
    model_types: tuple[str, ...] = attrs.field(converter=tuple)
    gguf: GGUFSpec | None = None
    sanitize: Callable[[dict[str, mx.array], dict[str, Any]], dict[str, mx.array]] | None = None


@attrs.define
class LoadedModel:
    """A model ready to run: the network, its tokenizer and where it came from."""

    model: Model
    tokenizer: Tokenizer
    family: ModelFamily
    source: str = ""
    path: Path | None = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids

    @property
    def context_length(self) -> int | None:
        """Longest prompt the model handles exactly. A model trained with a sliding window
        (Mistral v0.1, Gemma 3, Phi-3) is exact past it only when its family applies the window
        (Model.sliding_window_attention); otherwise prompts are limited to the window."""
        config = self.model.config
        limit = config.get("max_position_embeddings")
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        if window and (limit is None or window < limit) and not self.model.sliding_window_attention:
            return int(window)
        return limit

    def replace(self, **changes: Any) -> "LoadedModel":
        return attrs.evolve(self, **changes)
