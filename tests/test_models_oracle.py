"""Llama and Qwen3 logits against Hugging Face transformers (PyTorch CPU) on random tiny configs.

Each case builds the transformers model, saves it with `save_pretrained` (config.json as
transformers 5 writes it, safetensors) and loads that folder through `load_model`, so the
config parsing and the loader are under test too. Weights use a large init so logits are
O(1), not near zero where any max-abs bound would pass trivially.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

from stratlm.loaders.loading import load_model  # noqa: E402
from stratlm.testing import byte_tokenizer  # noqa: E402

VOCAB = 259  # the byte tokenizer's vocabulary
TOL = 1e-4
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=512, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    # wavelengths fall on both sides of and inside [16/4, 16/1]: all three llama3 branches are used
    "llama3-rope-gqa-untied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope-bias": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3-gqa-tied": ("qwen3", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-mha-untied": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1000000.0)),
}


def hf_model(family: str, overrides: dict, seed: int = 0):
    cls_config, cls_model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    return cls_model(cls_config(**{**BASE, **overrides})).eval()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (transformers model, the same weights loaded by stratlm from a saved folder)."""
    out = {}
    for name, (family, overrides) in CASES.items():
        hf = hf_model(family, overrides)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        byte_tokenizer().save(folder)
        out[name] = (hf, load_model(str(folder), dtype="float32").model)
    return out


def reference(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_cached_decode_match_transformers(pairs, name):
    hf, ours = pairs[name]
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 24))  # 24 > original_max_position_embeddings
    ref = reference(hf, ids)
    assert ref.std() > 0.5, "logits too flat for the comparison to mean anything"

    prefill = np.array(ours(mx.array(ids)))
    assert np.abs(prefill - ref).max() < TOL

    cache = ours.make_cache()
    steps = [np.array(ours(mx.array(ids[:, :7]), cache))]  # a prompt, then one token at a time
    steps += [np.array(ours(mx.array(ids[:, i : i + 1]), cache)) for i in range(7, ids.shape[1])]
    assert cache[0].offset == ids.shape[1]
    assert np.abs(np.concatenate(steps, axis=1) - ref).max() < TOL


def test_rope_scaling_is_exercised(pairs):
    """The llama3 case differs from plain RoPE on the same weights: the oracle would catch a no-op."""
    hf, _ = pairs["llama3-rope-gqa-untied"]
    plain = hf_model("llama", {**CASES["llama3-rope-gqa-untied"][1], "rope_scaling": None})
    ids = np.random.RandomState(2).randint(0, VOCAB, (1, 24))
    assert np.abs(reference(hf, ids) - reference(plain, ids)).max() > 1e-2


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3-mha-untied"])
def test_left_padded_batch_rows_equal_single_rows(pairs, name):
    """Rows of different lengths, left-padded in one batch, give each row's unpadded logits."""
    _, ours = pairs[name]
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, VOCAB, n).tolist() for n in (9, 4, 6)]
    continuation = rng.randint(0, VOCAB, (3, 5)).tolist()
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    batch = np.array([[0] * pad + p for pad, p in zip(padding, prompts)])  # pad id 0 must be masked out

    cache = ours.make_cache(left_padding=padding)
    batch_prefill = np.array(ours(mx.array(batch), cache))
    batch_steps = [np.array(ours(mx.array([[c[i]] for c in continuation]), cache))[:, 0] for i in range(len(continuation[0]))]

    for row, (pad, prompt) in enumerate(zip(padding, prompts)):
        single_cache = ours.make_cache()
        single = np.array(ours(mx.array([prompt]), single_cache))[0]
        assert np.abs(batch_prefill[row, pad:] - single).max() < TOL
        for i, step in enumerate(batch_steps):
            expected = np.array(ours(mx.array([[continuation[row][i]]]), single_cache))[0, 0]
            assert np.abs(step[row] - expected).max() < TOL


@pytest.mark.parametrize(
    "scaling", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}]
)
@pytest.mark.parametrize("length", [1, 3, 17])
def test_cpu_rope_tables_equal_fast_rope(scaling, length):
    """Cached inference on the CPU rotates with tables made from fast.rope itself (one matmul for
    one position, cos/sin for several); they must give fast.rope's result at any offset."""
    from stratlm.models.transformer import RoPE

    rope = RoPE(32, 10000.0, scaling)
    for offset in (0, 5, 1000):
        x = mx.random.normal((2, 3, length, 32))
        expected = mx.fast.rope(x, 32, traditional=False, base=rope.base, scale=rope.scale, offset=offset, freqs=getattr(rope, "_freqs", None))
        assert mx.abs(rope(x, offset) - expected).max().item() < 1e-5
