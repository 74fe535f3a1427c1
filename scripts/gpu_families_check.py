"""The model families on CUDA: logits of tiny random models (prefill; a prompt then cached
decoding past the sliding window; a left-padded batch of two) computed on the GPU against the
same models on MLX's CPU stream, and greedy/batch/speculative decoding through the Engine (which
puts a model in the fused layout on CUDA). Prints one line per family and the largest difference."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

from stratlm.engine import Engine
from stratlm.core.model import LoadedModel
from stratlm.loaders.loading import build_model, family_for
from stratlm.testing import byte_tokenizer, tiny_config

WINDOW = 5
CONFIGS = {
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": dict(sliding_window=WINDOW),
    "gemma3_text": dict(num_hidden_layers=3, sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
    "olmo2": {}, "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
    "smollm3": dict(num_hidden_layers=4),
}


def run(model, ids: np.ndarray) -> np.ndarray:
    out = [np.array(model(mx.array(ids)))]
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, :9]), cache))]
    steps += [np.array(model(mx.array(ids[:, i : i + 1]), cache)) for i in range(9, ids.shape[1])]
    return np.concatenate(out + [np.concatenate(steps, axis=1)], axis=1)


worst = 0.0
for model_type, overrides in CONFIGS.items():
    config = tiny_config(model_type, **overrides)
    mx.random.seed(0)
    with mx.stream(mx.cpu):
        model = build_model(config)
    params = model.parameters()
    ids = np.random.RandomState(1).randint(0, config["vocab_size"], (2, 90))  # wraps the rotating cache (window - 1 + 64)
    with mx.stream(mx.cpu):
        ref = run(model, ids)
    got = run(model, ids)
    diff = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
    worst = max(worst, diff)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), family=family_for(config), source=model_type)
    kwargs = dict(chat_template=False, max_tokens=16, ignore_eos=True)
    prompts = ["a prompt longer than the window", "short"]
    greedy = [Engine(loaded, "greedy").generate(p, **kwargs).token_ids for p in prompts]
    batch = [r.token_ids for r in Engine(loaded, "batch").generate(prompts, **kwargs)]
    spec = [Engine(loaded, "speculative", draft=loaded, num_draft=3).generate(p, **kwargs).token_ids for p in prompts]
    print(f"{model_type:12s} gpu vs cpu rel max diff {diff:.2e}  batch==greedy {batch == greedy}  speculative==greedy {spec == greedy}", flush=True)
print(f"worst {worst:.2e}", file=sys.stderr)
