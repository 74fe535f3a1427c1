"""Tiny models for the strategy tests, and a greedy comparison robust to exact ties.

A random tiny model has near-uniform logits and soon repeats one token. Scaling its weights
up (x3) makes it produce varied text, and scaling the final norm up makes the logits well
separated, so two correct code paths (batch vs single, speculative vs greedy) agree.
"""

from __future__ import annotations

import functools
from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_map, tree_map_with_path

from stratlm.core.model import LoadedModel
from stratlm.core.tokenizer import Tokenizer
from stratlm.testing import tiny_model

TIE_GAP = 2e-3  # top-2 logit gap under which float rounding may legitimately flip an argmax


def sharpen(loaded: LoadedModel, weight_scale: float = 3.0, head_scale: float = 20.0) -> LoadedModel:
    def scale(path: str, x: mx.array) -> mx.array:
        if path.startswith("model.norm"):
            return x * head_scale
        if "proj" in path or "embed" in path:
            return x * weight_scale
        return x

    loaded.model.update(tree_map_with_path(scale, loaded.model.parameters()))
    return loaded


@functools.lru_cache(maxsize=None)
def sharp_model(seed: int, weight_scale: float = 3.0, head_scale: float = 20.0, layers: int = 2, vocab_size: int | None = None) -> LoadedModel:
    """Cached: tests must not modify the returned model."""
    overrides = {"num_hidden_layers": layers}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return sharpen(tiny_model("llama", seed=seed, **overrides), weight_scale, head_scale)


@functools.lru_cache(maxsize=None)
def noisy_copy(seed: int, noise: float, noise_seed: int = 1) -> LoadedModel:
    """sharp_model(seed) with Gaussian noise on every weight: a draft that agrees only partly."""
    target = sharp_model(seed)
    copy = sharpen(tiny_model("llama", seed=seed))
    key = [mx.random.key(noise_seed)]

    def perturb(x: mx.array) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        return x + noise * x.std() * mx.random.normal(x.shape, key=sub)

    copy.model.update(tree_map(perturb, copy.model.parameters()))
    assert copy.model.config == target.model.config
    return copy


def with_eos(loaded: LoadedModel, eos: int) -> LoadedModel:
    """The same model whose tokenizer also ends a completion at `eos`."""
    return loaded.replace(tokenizer=Tokenizer(loaded.tokenizer.hf, eos_token_ids=[eos]))


def assert_same_greedy(loaded: LoadedModel, prompt: Sequence[int], got: Sequence[int], expected: Sequence[int]) -> None:
    """got == expected, except that they may part where the model's top-2 logits tie to rounding."""
    got, expected = list(got), list(expected)
    if got == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert at is not None, f"one output is a prefix of the other: got {got}, expected {expected}"
    logits = loaded.model(mx.array([list(prompt) + expected[:at]]))[0, -1]
    top2 = mx.sort(logits)[-2:].tolist()
    assert top2[1] - top2[0] < TIE_GAP, (
        f"outputs differ at token {at} where the greedy choice is clear (gap {top2[1] - top2[0]:.4f}): got {got}, expected {expected}"
    )
