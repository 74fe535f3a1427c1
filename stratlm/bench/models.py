"""The models a benchmark runs: the embedded SmolLM2, or a random model of a real shape.

Decode speed depends on shapes, not values, so a checkpoint that cannot be downloaded is
replaced by random weights of its exact config. mlx-lm gets the same weights through an
ordinary model folder written by `save_model`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from stratlm.device import cpu_active
from stratlm.core.errors import ConfigError
from stratlm.core.model import LoadedModel
from stratlm.loaders.loading import build_model, family_for, load_model, parse_dtype, save_model
from stratlm.testing import byte_tokenizer

#: The published Qwen3-0.6B config (Qwen/Qwen3-0.6B config.json).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

RANDOM_MODELS: dict[str, dict[str, Any]] = {"qwen3-0.6b-random": QWEN3_0_6B}
EMBEDDED = "smollm2-135m"


def bench_model(name: str | None, dtype: str | None, seed: int = 0) -> LoadedModel:
    """The embedded SmolLM2 (None or 'smollm2-135m'), a random model by name, or any load_model source."""
    if name in RANDOM_MODELS:
        config = dict(RANDOM_MODELS[name])
        mx.random.seed(seed)
        model = build_model(config, dtype=parse_dtype(dtype))
        model.config["torch_dtype"] = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}[model.model.norm.weight.dtype]
        return LoadedModel(model=model, tokenizer=byte_tokenizer(), family=family_for(config), source=name)
    if name in (None, EMBEDDED):
        name = None  # on the CPU: the GGUF's 4/8-bit weights on stratlm's kernels
    return load_model(name, dtype=dtype)


def model_folder(loaded: LoadedModel, root: str | Path | None = None, dtype: str | None = None) -> Path:
    """Write the model as an ordinary folder (what mlx-lm and transformers load).

    On the CPU a quantized model is written dense (the same values, expanded to fp32): that is
    mlx-lm's fastest form there, its quantized matmul being slower than dense BLAS on the CPU."""
    out = Path(tempfile.mkdtemp(prefix="stratlm-bench-", dir=root))
    if cpu_active() and is_quantized(loaded) and loaded.path is not None:
        loaded = load_model(str(loaded.path), dtype=dtype, quantized="dequantize")
    return save_model(loaded, out)


def is_quantized(loaded: LoadedModel) -> bool:
    return "quantization" in loaded.model.config


def weight_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes of weights one decode step must read: every parameter once, except an untied
    input embedding, of which only the looked-up rows are read; the CPU kernels' fp16 copies of
    scales and biases in place of the fp32 ones (once made, by a forward)."""
    from mlx.utils import tree_flatten

    from stratlm.backends.cpu.quantized import kernel_scale_savings

    params = dict(tree_flatten(loaded.model.parameters()))
    total = sum(v.nbytes for v in params.values())
    if not loaded.model.config.get("tie_word_embeddings", False):
        embed = [v for k, v in params.items() if k.endswith("embed_tokens.weight")]
        total -= sum(v.nbytes - v.nbytes // v.shape[0] for v in embed)
    return total - kernel_scale_savings(loaded.model)


def prompt_tokens(loaded: LoadedModel, n: int, text: str | None = None) -> list[int]:
    """Exactly n prompt tokens: the text (default: a passage) repeated and cut."""
    if n < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {n}")
    text = text or PASSAGE
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ConfigError("the benchmark prompt text gives no tokens; pass a non-empty --prompt")
    vocab = loaded.model.vocab_size
    ids = [i for i in ids if i < vocab] or [0]
    return (ids * (n // len(ids) + 1))[:n]


PASSAGE = (
    "The river town woke slowly. Fishermen mended their nets on the stone quay while the baker "
    "pulled the first loaves from the oven, and the smell of bread drifted over the water. "
    "Children ran between the stalls of the market, chasing a dog that had stolen a sausage, "
    "and the old clockmaker opened his shutters to let the morning light fall on his workbench. "
)
