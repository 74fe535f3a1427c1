"""The Model interface, and the family descriptor a model plugin registers.

A model maps token ids (B, L) and a per-layer cache to logits (B, L, vocab). It exposes
its pieces - `embed`, `layers`, `head` - so transforms can reorder, drop or wrap blocks
and read hidden states without knowing the family.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache


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
        compiled step over a preallocated cache (core.generation.CompiledStep) than as the plain
        forward; used when STRATLM_COMPILE is not set. Default: no."""
        return False

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def make_cache(self, left_padding: Sequence[int] | None = None) -> list[KVCache]:
        return [KVCache(left_padding) for _ in self.layers]

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        hidden = self.embed(tokens)
        mask = attention_mask(tokens.shape[1], cache[0] if cache else None)
        for i, block in enumerate(self.layers):
            hidden = block(hidden, mask, cache[i] if cache else None)
        return self.head(hidden)

    def hidden_states(self, tokens: mx.array) -> list[mx.array]:
        """The residual stream entering each block, and leaving the last one (len = layers + 1)."""
        hidden = self.embed(tokens)
        mask = attention_mask(tokens.shape[1], None)
        states = [hidden]
        for block in self.layers:
            hidden = block(hidden, mask, None)
            states.append(hidden)
        return states


def attention_mask(n_new: int, cache: KVCache | None) -> mx.array | str | None:
    if cache is not None:
        return cache.make_mask(n_new)
    return "causal" if n_new > 1 else None


@attrs.frozen
class ModelFamily:
    """What a model plugin registers: how to build a family's model from its config.

    `model_types` are Hugging Face `model_type` values; `gguf_architectures` the GGUF
    `general.architecture` values this family reads. GGUF converters store the Q/K rows
    of some families (Llama) permuted for ggml's RoPE; `gguf_permute_qk` undoes that.
    """

    name: str
    build: Callable[[dict[str, Any]], Model]
    model_types: tuple[str, ...] = attrs.field(converter=tuple)
    gguf_architectures: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    gguf_permute_qk: bool = False
    sanitize: Callable[[dict[str, mx.array], dict[str, Any]], dict[str, mx.array]] | None = None
