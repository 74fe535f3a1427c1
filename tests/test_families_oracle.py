"""The other families' logits against Hugging Face transformers (PyTorch CPU, fp32) on random
tiny configs: prefill without a cache, a prompt then cached decoding, and a left-padded batch of
two rows of different lengths (as the batch strategy pads) against each row alone.

Each case builds the transformers model, saves it with `save_pretrained` and loads that folder
through `load_model`, so config parsing, checkpoint names and the loader are under test too.
Sliding-window cases use a window much smaller than the sequence, and sequences long enough
for the rotating cache to wrap (its ring holds window - 1 + 64 positions).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

from stratlm.core.cache import RotatingKVCache  # noqa: E402
from stratlm.core.errors import ConfigError  # noqa: E402
from stratlm.loaders.loading import load_model  # noqa: E402
from stratlm.testing import byte_tokenizer  # noqa: E402

VOCAB = 259  # the byte tokenizer's vocabulary
TOL = 1e-4
LONG = 96  # > the ring (window - 1 + 64) of every windowed case: decoding wraps it
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512, initializer_range=0.2,
            pad_token_id=None, bos_token_id=None, eos_token_id=None)

# name -> (transformers config class, model class, overrides, sequence length)
CASES = {
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0), 24),
    "qwen2-untied-mha": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False), 24),
    # layers from max_window_layers on slide (transformers' layer_types), the first attends fully
    "qwen2-sliding-layers": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), LONG),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5, tie_word_embeddings=False), LONG),
    "mistral-no-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, num_key_value_heads=1), 24),
    # local, global, local: windowed layers with their own RoPE base, the global one's scaled
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=30.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), LONG),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=5), LONG),
    # LongRoPE (short factors here: every position within original_max_position_embeddings) on half of each head
    "phi3-longrope-partial": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=4, tie_word_embeddings=True, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5, 3.0, 7.0], "long_factor": [2.0, 5.0, 11.0, 19.0]}), 24),
    # layer 0 routes each token to 2 of 4 experts (renormalized), layer 1 is dense; the long
    # prompt sorts its (token, expert) pairs by expert, decoding does not
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True), LONG),
    "qwen3-moe-every-layer": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=False, tie_word_embeddings=True), 24),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(tie_word_embeddings=False), 24),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.5), 24),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(num_hidden_layers=4, no_rope_layer_interval=2), 24),
    "gemma3-untied-mha": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False, sliding_window=64), 24),
}


def hf_model(case: str, seed: int = 0):
    config_cls, model_cls, overrides, _ = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norms and biases start at 1 or 0: make them matter too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (transformers model, the same weights loaded by stratlm from a saved folder)."""
    out = {}
    for name in CASES:
        hf = hf_model(name)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        byte_tokenizer().save(folder)
        out[name] = (hf, load_model(str(folder), dtype="float32").model)
        FOLDERS[name] = folder
    return out


FOLDERS: dict = {}  # name -> the saved folder (filled by the fixture)


def reference(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids))).logits.numpy()


def ids_for(name: str, rows: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (rows, CASES[name][3]))


def decode_stepwise(model, ids: np.ndarray, prompt: int, cache=None) -> np.ndarray:
    """A prompt of `prompt` positions in one forward, then one position at a time."""
    cache = cache if cache is not None else model.make_cache()
    steps = [np.array(model(mx.array(ids[:, :prompt]), cache))]
    steps += [np.array(model(mx.array(ids[:, i : i + 1]), cache)) for i in range(prompt, ids.shape[1])]
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_cached_decode_match_transformers(pairs, name):
    hf, ours = pairs[name]
    ids = ids_for(name)
    ref = reference(hf, ids)
    assert ref.std() > 0.5, "logits too flat for the comparison to mean anything"
    assert np.abs(np.array(ours(mx.array(ids))) - ref).max() < TOL
    assert np.abs(decode_stepwise(ours, ids, 9) - ref).max() < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_left_padded_batch_matches_transformers_per_row(pairs, name):
    """Two rows of different lengths, left-padded in one batch (pad id 0, masked), prefilled then
    decoded: each row's logits are transformers' for that row alone."""
    hf, ours = pairs[name]
    rng = np.random.RandomState(3)
    total = CASES[name][3]
    rows = [rng.randint(0, VOCAB, total).tolist(), rng.randint(0, VOCAB, total - 5).tolist()]
    prompt = [8, 3]  # prompt lengths; the rest is decoded one token a step
    padding = [max(prompt) - p for p in prompt]
    cache = ours.make_cache(left_padding=padding)
    batch = mx.array([[0] * pad + r[:p] for r, p, pad in zip(rows, prompt, padding)])
    prefill = np.array(ours(batch, cache))
    steps = []
    for i in range(total - max(prompt)):
        # row 0 decodes its own tokens; row 1 (shorter) runs out first and then repeats its last one
        column = [r[min(p + i, len(r) - 1)] for r, p in zip(rows, prompt)]
        steps.append(np.array(ours(mx.array([[c] for c in column]), cache))[:, 0])
    for b, (r, p, pad) in enumerate(zip(rows, prompt, padding)):
        n = min(len(r), p + len(steps))
        ref = reference(hf, [r[:n]])[0]
        assert np.abs(prefill[b, pad:] - ref[:p]).max() < TOL
        got = np.stack([s[b] for s in steps[: n - p]])
        assert np.abs(got - ref[p:n]).max() < TOL


def test_prompts_in_chunks_and_speculative_trims_over_a_wrapped_window(pairs):
    """Multi-position forwards on a wrapped ring (prefill chunks, a speculative verify) and trims
    of rejected positions give transformers' logits; trimming more than the ring keeps is refused."""
    hf, ours = pairs["mistral-window"]
    ids = ids_for("mistral-window", seed=4)
    ref = reference(hf, ids)
    cache = ours.make_cache()
    got = [np.array(ours(mx.array(ids[:, i : i + 7]), cache)) for i in range(0, 77, 7)]  # 11 chunks: wraps
    assert np.abs(np.concatenate(got, axis=1) - ref[:, :77]).max() < TOL
    # a verify of 6 drafted positions of which 2 are accepted: the 4 rejected ones are wrong tokens
    drafted = np.concatenate([ids[:, 77:79], (ids[:, 79:83] + 1) % VOCAB], axis=1)
    verify = np.array(ours(mx.array(drafted), cache))
    assert np.abs(verify[:, :2] - ref[:, 77:79]).max() < TOL
    assert all(c.trim(4) == 4 for c in cache)
    rest = np.concatenate([np.array(ours(mx.array(ids[:, i : i + 1]), cache)) for i in range(79, ids.shape[1])], axis=1)
    assert np.abs(rest - ref[:, 79:]).max() < TOL
    assert isinstance(cache[0], RotatingKVCache) and cache[0].offset == ids.shape[1]
    with pytest.raises(ConfigError, match="at most 64 positions"):
        cache[0].trim(65)


def test_batch_rows_filtered_from_a_wrapped_window(pairs):
    """Dropping a finished row (the batch strategy's filter) keeps the other row's positions."""
    hf, ours = pairs["mistral-window"]
    ids = ids_for("mistral-window", rows=2, seed=5)
    ref = reference(hf, ids[1:])
    cache = ours.make_cache(left_padding=[0, 0])
    decode_stepwise(ours, ids[:, :80], 10, cache)
    for c in cache:
        c.filter([1])
    rest = np.concatenate([np.array(ours(mx.array(ids[1:, i : i + 1]), cache)) for i in range(80, ids.shape[1])], axis=1)
    assert np.abs(rest - ref[:, 80:]).max() < TOL


# a family's folder with one field taken out of config.json -> what the one-line error must say
MISSING_FIELD = {
    "qwen2-tied": ("vocab_size", "config.json lacks vocab_size (needed for model_type 'qwen2')"),
    "mistral-window": ("num_attention_heads", "config.json lacks num_attention_heads (needed for model_type 'mistral')"),
    "phi3-window": ("intermediate_size", "config.json lacks intermediate_size (needed for model_type 'phi3')"),
    "qwen3-moe": ("moe_intermediate_size", "config.json lacks moe_intermediate_size (needed for model_type 'qwen3_moe')"),
    "qwen3-moe-every-layer": ("num_local_experts", "config.json lacks num_experts (or num_local_experts)"),
    "olmo2": ("hidden_size", "config.json lacks hidden_size (needed for model_type 'olmo2')"),
    "granite": ("num_hidden_layers", "config.json lacks num_hidden_layers (needed for model_type 'granite')"),
    "smollm3": ("num_hidden_layers", "config.json lacks num_hidden_layers (needed for model_type 'smollm3')"),
    # Gemma 3 fills what its config leaves out with Gemma3TextConfig's defaults, as transformers does:
    # the weights then do not fit, and the error names the parameter and both shapes
    "gemma3": ("hidden_size", "do not fit a gemma3 model of this config: Expected shape (259, 2304) but received shape (259, 64)"),
}


@pytest.mark.parametrize("name", list(MISSING_FIELD))
def test_a_missing_config_field_is_named_on_the_command_line(pairs, tmp_path, capsys, name):
    import json
    import shutil

    from stratlm.cli.main import main

    field, message = MISSING_FIELD[name]
    folder = tmp_path / name
    shutil.copytree(FOLDERS[name], folder)
    config = json.loads((folder / "config.json").read_text())
    assert field in config
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != field}))
    assert main(["generate", "hi", "-m", str(folder), "--max-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_the_window_is_exercised(pairs):
    """The windowed case's reference differs from full attention on the same weights: an
    implementation ignoring the window would fail the comparisons above."""
    hf, _ = pairs["mistral-window"]
    full = hf_model("mistral-window")
    full.config.sliding_window = None
    ids = ids_for("mistral-window")
    assert np.abs(reference(hf, ids) - reference(full, ids)).max() > 1e-2


def test_longrope_long_factors_past_the_original_context(pairs):
    """A forward reaching past original_max_position_embeddings rotates with the long factors."""
    hf, ours = pairs["phi3-longrope-partial"]
    ids = np.random.RandomState(6).randint(0, VOCAB, (1, 80))
    ref = reference(hf, ids)
    assert np.abs(np.array(ours(mx.array(ids))) - ref).max() < TOL
    assert np.abs(reference(hf, ids[:, :60]) - ref[:, :60]).max() > 1e-2  # short factors there: the switch is exercised


def test_quantized_experts_run_through_gather_qmm(pairs, tmp_path):
    """A 4-bit MoE model saved and loaded with its experts kept quantized (gather_qmm) gives the
    logits of the same weights dequantized to fp32 at load."""
    import mlx.nn as nn

    from stratlm.loaders.loading import save_model
    from stratlm.models.qwen3_moe import QuantizedSwitchLinear

    folder = tmp_path / "q"
    loaded = load_model(str(FOLDERS["qwen3-moe"]), dtype="float32")
    nn.quantize(loaded.model, group_size=32, bits=4)
    loaded.model.config = {**loaded.model.config, "quantization": {"group_size": 32, "bits": 4}}
    save_model(loaded, folder)
    kept = load_model(str(folder), dtype="float32", quantized="keep").model
    dense = load_model(str(folder), dtype="float32", quantized="dequantize").model
    assert isinstance(kept.layers[0].mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    ids = mx.array(ids_for("qwen3-moe"))
    assert np.abs(np.array(kept(ids)) - np.array(dense(ids))).max() < TOL


def test_experts_not_chosen_are_not_computed(pairs, monkeypatch):
    """The experts run through mx.gather_mm, given the stacked weights and each token's k picks;
    the experts the router does not pick for a short prompt and its decoding steps are never
    read: NaN weights there leave the logits exactly as they were (a dense mixture that weighted
    them by 0 would give NaN), while NaN in a chosen expert reaches the logits."""
    from stratlm.models.qwen3_moe import SwitchGLU

    ids = ids_for("qwen3-moe-every-layer")[:, :4]
    chosen: dict[int, set] = {}
    original, gather_mm = SwitchGLU.__call__, mx.gather_mm
    gathers = []

    def recording(self, x, indices):
        chosen.setdefault(id(self), set()).update(np.array(indices).ravel().tolist())
        return original(self, x, indices)

    def recording_gather_mm(a, b, *args, rhs_indices=None, **kwargs):
        gathers.append((b.shape, rhs_indices.shape))
        return gather_mm(a, b, *args, rhs_indices=rhs_indices, **kwargs)

    monkeypatch.setattr(mx, "gather_mm", recording_gather_mm)

    def run():
        model = load_model(str(FOLDERS["qwen3-moe-every-layer"]), dtype="float32").model
        return model, decode_stepwise(model, ids, 2)

    monkeypatch.setattr(SwitchGLU, "__call__", recording)
    model, expected = run()
    monkeypatch.setattr(SwitchGLU, "__call__", original)
    steps = 3  # the 2-position prompt and 2 decoding steps, each through 2 layers of gate, up and down
    assert len(gathers) == steps * 2 * 3 and {b[0] for b, _ in gathers} == {8} and {i[-1] for _, i in gathers} == {3}
    experts = [layer.mlp.switch_mlp for layer in model.layers]
    unused = [sorted(set(range(8)) - chosen[id(e)]) for e in experts]
    assert all(unused), unused  # 4 tokens, 3 of 8 experts each: some are left out in every layer

    def poison(switch, picks):
        for proj in (switch.gate_proj, switch.up_proj, switch.down_proj):
            proj.weight = mx.array(np.where(np.isin(np.arange(8), picks)[:, None, None], np.nan, np.array(proj.weight)))

    for switch, picks in zip(experts, unused):
        poison(switch, picks)
    assert np.array_equal(decode_stepwise(model, ids, 2), expected)
    poison(experts[0], [sorted(chosen[id(experts[0])])[0]])
    assert np.isnan(decode_stepwise(model, ids, 2)).any()


@pytest.mark.parametrize("name", ["mistral-window", "gemma3", "qwen3-moe"])
def test_strategies_over_the_new_caches(pairs, name):
    """Greedy, batch and speculative decoding (a model draft: its cache and the target's trimmed
    every step) give the same tokens on a windowed/MoE model, generating past the window; best-of-n
    (one prefill, its cache rows replicated) runs."""
    from stratlm.engine import Engine

    loaded = load_model(str(FOLDERS[name]), dtype="float32")
    prompts = ["a prompt longer than the window", "short"]
    kwargs = dict(chat_template=False, max_tokens=20, ignore_eos=True)
    greedy = [Engine(loaded, "greedy").generate(p, **kwargs).token_ids for p in prompts]
    for prompt, tokens in zip(prompts, greedy):  # transformers' argmax at every generated position
        ids = Engine(loaded, "greedy").render(prompt, chat_template=False)[1]
        assert reference(pairs[name][0], [ids + list(tokens)])[0, len(ids) - 1 : -1].argmax(-1).tolist() == list(tokens)
    assert [r.token_ids for r in Engine(loaded, "batch").generate(prompts, **kwargs)] == greedy
    speculative = Engine(loaded, "speculative", draft=loaded, num_draft=3)
    assert [speculative.generate(p, **kwargs).token_ids for p in prompts] == greedy
    # another model drafting more tokens a step than a sliding-window ring can take back (most
    # rejected): drafting is capped at what the caches can trim, and the tokens stay the target's
    other = load_model(str(FOLDERS["mistral-window"]), dtype="float32")
    long = dict(kwargs, max_tokens=90)
    expected = Engine(loaded, "greedy").generate(prompts[0], **long).token_ids
    assert Engine(loaded, "speculative", draft=other, num_draft=100).generate(prompts[0], **long).token_ids == expected
    best = Engine(loaded, "best-of-n", n=3).generate(prompts[0], temperature=0.8, seed=1, **kwargs)
    assert len(best.token_ids) == 20


def test_qwen2_gguf_with_biases_loads_to_transformers_logits(tmp_path):
    """A Qwen2 GGUF written as llama.cpp's converter does (Q/K rows as they are, biases kept)
    loads to the logits of the transformers model it was written from."""
    pytest.importorskip("gguf")
    from test_gguf import byte_vocab, write_gguf  # the GGUF tests' writer

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**BASE, "vocab_size": len(byte_vocab()), "tie_word_embeddings": False})
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, hf, "qwen2", gguf_quant_type("F32"))
    ids = np.random.RandomState(0).randint(0, len(byte_vocab()), (2, 12))
    ours = load_model(str(path), dtype="float32").model
    assert np.abs(np.array(ours(mx.array(ids))) - reference(hf, ids)).max() < TOL


def gguf_quant_type(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name)


def _windowed_attention_reference(q, keys, values, q_pos, window, padding):
    """Attention of queries at positions q_pos over every key so far, masked to the window and
    the row's padding (numpy, float64)."""
    k_pos = np.arange(keys.shape[2])
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
    allowed = allowed[None, None] & (k_pos[None, None, None, :] >= np.asarray(padding)[:, None, None, None])
    scores = np.einsum("bhqd,bhkd->bhqk", q, keys) / np.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # a padding query may see no key: its row is not compared
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", weights, values)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    window=st.integers(1, 6),
    room=st.integers(1, 4),
    padding=st.lists(st.integers(0, 3), min_size=2, max_size=2),
    ops=st.lists(st.one_of(st.tuples(st.just("add"), st.integers(1, 9)), st.tuples(st.just("trim"), st.integers(0, 4))), min_size=1, max_size=14),
)
def test_rotating_cache_equals_windowed_attention_over_everything(window, room, padding, ops):
    """Any sequence of appends (one position or several) and trims (within the room) through a
    small ring gives the attention over all positions masked to the window and the padding."""
    rng = np.random.RandomState(0)
    cache = RotatingKVCache(window, left_padding=padding, trim_room=room)
    keys = np.zeros((2, 1, 0, 4))
    values = np.zeros((2, 1, 0, 4))
    written = 0
    for op, n in ops:
        if op == "trim":
            n = min(n, cache.offset)
            high = max(written, cache.offset)
            if high > cache.size and high - (cache.offset - n) > room:  # positions it needs were overwritten
                with pytest.raises(ConfigError, match="can take back at most"):
                    cache.trim(n)
                continue
            assert cache.trim(n) == n
            keys, values = keys[:, :, : cache.offset], values[:, :, : cache.offset]
            continue
        written = max(written, cache.offset + n)
        q, k, v = (rng.randn(2, 1, n, 4) for _ in range(3))
        q_pos = np.arange(cache.offset, cache.offset + n)
        keys, values = np.concatenate([keys, k], axis=2), np.concatenate([values, v], axis=2)
        mask = cache.make_mask(n)
        ck, cv = cache.update_and_fetch(mx.array(k, dtype=mx.float32), mx.array(v, dtype=mx.float32))
        got = np.array(mx.fast.scaled_dot_product_attention(mx.array(q, dtype=mx.float32), ck, cv, scale=0.5, mask=mask))
        ref = _windowed_attention_reference(q, keys, values, q_pos, window, padding)
        live = q_pos[None, :] >= np.asarray(padding)[:, None]  # a padding query's own output is never used
        assert np.abs(got - ref).max(axis=(1, 3))[live].max(initial=0) < 1e-4


def qwen3_moe_hf(**overrides):
    torch.manual_seed(0)
    from test_gguf import byte_vocab  # the GGUF tests' vocabulary

    config = transformers.Qwen3MoeConfig(**{**BASE, "vocab_size": len(byte_vocab()), "tie_word_embeddings": False, "num_experts": 4,
                                             "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True, **overrides})
    return transformers.Qwen3MoeForCausalLM(config).eval()


def write_qwen3_moe_gguf(path, hf, quantizer=None) -> None:
    """A Qwen3-MoE GGUF in llama.cpp's layout (experts stacked in ffn_{gate,up,down}_exps, the
    router in ffn_gate_inp, qwen3moe.expert_* metadata); quantizer(gguf name, values) -> (bytes,
    ggml type) or None (F32)."""
    import gguf

    from test_gguf import MERGES, byte_vocab

    tokens, config = byte_vocab(), hf.config
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_count(config.num_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(MERGES)
    w.add_eos_token_id(tokens.index("<|im_end|>"))

    def add(name: str, data: np.ndarray) -> None:
        quantized = quantizer(name, data) if quantizer is not None else None
        if quantized is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantized[0], raw_dtype=quantized[1])

    base = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
            "mlp.gate": "ffn_gate_inp"}
    experts: dict = {}
    for key, tensor in hf.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            add({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(key, "output.weight"), data)
            continue
        _, _, layer, rest = key.split(".", 3)
        if ".experts." in rest:  # mlp.experts.gate_up_proj (experts, 2 * inter, hidden) / down_proj, or per expert
            experts.setdefault(layer, {})[rest] = data
            continue
        add(f"blk.{layer}.{base[rest.rsplit('.', 1)[0]]}.weight", data)
    for layer, parts in experts.items():
        if "mlp.experts.gate_up_proj" in parts:
            gate_up, down = parts["mlp.experts.gate_up_proj"], parts["mlp.experts.down_proj"]
            gate, up = np.split(gate_up, 2, axis=1)
        else:
            n = config.num_experts
            gate, up, down = (np.stack([parts[f"mlp.experts.{e}.{p}.weight"] for e in range(n)]) for p in ("gate_proj", "up_proj", "down_proj"))
        for name, data in (("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", down)):
            add(f"blk.{layer}.{name}.weight", np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_moe_gguf_loads_to_transformers_logits(tmp_path):
    """A Qwen3-MoE GGUF in llama.cpp's layout loads to the logits of the transformers model it
    was written from."""
    pytest.importorskip("gguf")
    hf = qwen3_moe_hf()
    write_qwen3_moe_gguf(tmp_path / "moe.gguf", hf)
    ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (2, 12))
    ours = load_model(str(tmp_path / "moe.gguf"), dtype="float32").model
    assert np.abs(np.array(ours(mx.array(ids))) - reference(hf, ids)).max() < TOL


def test_qwen3_moe_gguf_experts_stay_quantized(tmp_path):
    """A Q4_K_M-style MoE GGUF (experts' gate/up Q4_K, down Q6_K, the rest Q8_0): the stacked
    expert tensors stay quantized (gather_qmm: Q4_K as 4-bit, Q6_K re-quantized to 8-bit) and
    give the logits of the same file expanded to fp32."""
    gguf = pytest.importorskip("gguf")
    from stratlm.backends.cpu import kernels
    from stratlm.loaders import gguf_quants as gq
    from stratlm.models.qwen3_moe import QuantizedSwitchLinear

    hf = qwen3_moe_hf(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_attention_heads=4, head_dim=64)
    types = {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q6_K"}

    def quantizer(name: str, data: np.ndarray):
        if data.ndim < 2:
            return None
        kind = types.get(name.split(".")[2], "Q8_0") if name.startswith("blk.") else "Q8_0"
        return gq.quantize(data, kind), getattr(gguf.GGMLQuantizationType, kind)

    path = tmp_path / "moe-q4km.gguf"
    write_qwen3_moe_gguf(path, hf, quantizer)
    ids = mx.array(np.random.RandomState(0).randint(0, hf.config.vocab_size, (2, 12)))
    with kernels.exact_mode():
        kept = load_model(str(path), dtype="float32", quantized="keep").model
        dense = load_model(str(path), dtype="float32", quantized="dequantize").model
        switch = kept.layers[0].mlp.switch_mlp
        assert isinstance(switch.gate_proj, QuantizedSwitchLinear) and (switch.gate_proj.bits, switch.down_proj.bits) == (4, 8)
        assert switch.gate_proj.weight.shape == (4, 256, 256 * 4 // 32)  # (experts, out, packed in)
        got, expected = np.array(kept(ids)), np.array(dense(ids))
    assert expected.std() > 0.1
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()  # Q6_K's 8-bit re-quantization: within its steps


HUB_STYLE = {  # config.json as the hub checkpoints spell them (before transformers 5's rope_parameters)
    "gemma3-1b-style": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        model_type="gemma3_text", num_hidden_layers=3, sliding_window=4, sliding_window_pattern=2, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None)),
    "phi3.5-style": ("Phi3Config", "Phi3ForCausalLM", dict(
        model_type="phi3", rope_theta=10000.0, original_max_position_embeddings=32, sliding_window=262144,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 2.0, 3.0, 5.0, 8.0, 9.0],
                      "long_factor": [1.0, 1.2, 2.0, 4.0, 8.0, 16.0, 24.0, 30.0]})),
    "qwen3-30b-a3b-style": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0)),
    # the windows below are the real ones (32768, 4096, 2047) shrunk under the test's sequence
    "qwen2.5-style": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        model_type="qwen2", use_sliding_window=False, sliding_window=8, max_window_layers=1, rope_theta=1000000.0, tie_word_embeddings=True)),
    # tie_word_embeddings, attention_bias and mlp_bias left out where transformers' default applies
    "mistral-7b-v0.1-style": ("MistralConfig", "MistralForCausalLM", dict(model_type="mistral", sliding_window=8, rope_theta=10000.0)),
    "mistral-7b-v0.3-style": ("MistralConfig", "MistralForCausalLM", dict(model_type="mistral", sliding_window=None, rope_theta=1000000.0)),
    "phi3-mini-4k-style": ("Phi3Config", "Phi3ForCausalLM", dict(
        model_type="phi3", sliding_window=8, rope_scaling=None, rope_theta=10000.0, original_max_position_embeddings=512)),
    "olmo2-style": ("Olmo2Config", "Olmo2ForCausalLM", dict(model_type="olmo2", rope_theta=500000.0, rope_scaling=None, attention_bias=False)),
    "granite-3.3-style": ("GraniteConfig", "GraniteForCausalLM", dict(
        model_type="granite", rope_theta=10000000.0, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.0078125, logits_scaling=8.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)),
    "smollm3-style": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        model_type="smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], no_rope_layer_interval=4, sliding_window=None,
        rope_theta=5000000.0)),  # tied and use_sliding_window false by transformers' default
}


def hub_style_folder(folder, name: str):
    """The transformers model of a HUB_STYLE config and its folder, config.json as the hub spells it."""
    import json

    config_cls, model_cls, hub = HUB_STYLE[name]
    hub = {**BASE, **hub}
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls).from_dict(dict(hub))).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(hub))  # what the hub checkpoint holds
    byte_tokenizer().save(folder)
    return hf


@pytest.mark.parametrize("name", list(HUB_STYLE))
def test_hub_style_configs_read_as_transformers_reads_them(tmp_path, name):
    """A config.json in the hub's older spelling (rope_theta / rope_local_base_freq / rope_scaling,
    sliding_window_pattern, num_experts, use_sliding_window false beside a window, no_rope_layers)
    gives the model transformers builds from it: the configs of the aliased checkpoints' families."""
    hf = hub_style_folder(tmp_path, name)
    ids = np.random.RandomState(7).randint(0, VOCAB, (1, 40))  # past the window and original_max_position_embeddings
    ours = load_model(str(tmp_path), dtype="float32").model
    ref = reference(hf, ids)
    assert np.abs(np.array(ours(mx.array(ids))) - ref).max() < TOL
    if name != "phi3.5-style":  # LongRoPE picks its factors by a forward's last position: stepwise differs by design
        assert np.abs(decode_stepwise(ours, ids, 6) - ref).max() < TOL


@pytest.mark.parametrize("name", list(HUB_STYLE))
def test_hub_style_folders_convert_to_what_mlx_lm_loads(tmp_path, name):
    """`stratlm convert --quantize 4` of each family's hub-style folder: stratlm and mlx_lm.load
    give the same logits from the output. The prompt is within every window (mlx-lm's Qwen2,
    Mistral and Phi-3 attend over everything), and Phi-3.5's past its original context (mlx-lm's
    LongRoPE always rotates by the long factors; transformers and stratlm by the short ones
    within it)."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from stratlm.backends.cpu import kernels
    from stratlm.loaders.convert import convert

    hub_style_folder(tmp_path / "hub", name)
    out = convert(str(tmp_path / "hub"), tmp_path / "q4", quantize="4", group_size=32, dtype="float32", progress=None).out
    ids = mx.array(np.random.RandomState(8).randint(0, VOCAB, (1, 40 if name == "phi3.5-style" else 8)))
    with kernels.exact_mode():
        ours = np.array(load_model(str(out), dtype="float32", quantized="keep").model(ids))
    theirs = np.array(mlx_lm.load(str(out))[0](ids))
    assert ours.std() > 0.1  # (Granite divides its logits by 8)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(ours).max()


def test_multimodal_gemma3_checkpoint_loads_as_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (model_type gemma3, the text model's config under
    text_config, its weights under language_model.*, a vision tower; as gemma-3-4b and up are)
    loads as the text model: transformers' logits for a text-only prompt, prefill and decode."""
    text = {**BASE, "num_hidden_layers": 3, "sliding_window": 4, "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1, image_token_index=VOCAB - 1,
                                       boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    byte_tokenizer().save(tmp_path)
    ids = np.random.RandomState(0).randint(0, VOCAB - 3, (1, 20))  # no image tokens
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert ref.std() > 0.5
    ours = load_model(str(tmp_path), dtype="float32").model
    assert np.abs(np.array(ours(mx.array(ids))) - ref).max() < TOL
    assert np.abs(decode_stepwise(ours, ids, 5) - ref).max() < TOL


def test_gemma3_gguf_loads_to_transformers_logits(tmp_path):
    """A Gemma 3 GGUF as llama.cpp's converter writes it (every norm weight + 1, its own names
    for the four block norms, the sliding window in the metadata, 5 local : 1 global layers)
    loads to the logits of the transformers model it was written from."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import MERGES, byte_vocab

    tokens = byte_vocab()
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(**{**BASE, "vocab_size": len(tokens), "num_hidden_layers": 6, "sliding_window": 4,
                                              "query_pre_attn_scalar": 16})
    config._attn_implementation = "eager"
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    w = gguf.GGUFWriter(str(tmp_path / "gemma3.gguf"), "gemma3")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_sliding_window(config.sliding_window)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(MERGES)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in hf.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if key.endswith("norm.weight"):
            data = data + 1.0  # the converter's norm shift
        if key == "lm_head.weight":
            continue  # tied
        if key in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor("token_embd.weight" if "embed" in key else "output_norm.weight", data)
            continue
        _, _, layer, rest = key.split(".", 3)
        w.add_tensor(f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ids = np.random.RandomState(0).randint(0, len(tokens), (1, 20))
    ours = load_model(str(tmp_path / "gemma3.gguf"), dtype="float32").model
    ref = reference(hf, ids)
    assert np.abs(np.array(ours(mx.array(ids))) - ref).max() < TOL
    assert np.abs(decode_stepwise(ours, ids, 5) - ref).max() < TOL


def test_phi3_gguf_with_longrope_loads_to_transformers_logits(tmp_path):
    """A Phi-3.5-style GGUF (fused attn_qkv and ffn_up, LongRoPE factors as rope_factors_long /
    _short tensors, partial rotary from the RoPE dimension count) loads to transformers' logits,
    past the original context (long factors)."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import MERGES, byte_vocab

    tokens = byte_vocab()
    short, long = [1.0, 1.5, 3.0, 7.0], [2.0, 5.0, 11.0, 19.0]
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**BASE, "vocab_size": len(tokens), "original_max_position_embeddings": 32, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "short_factor": short, "long_factor": long}})
    hf = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    w = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    w.add_context_length(config.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(32)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(0)
    w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(512 / 32) / np.log(32))))
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(MERGES)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_tensor("rope_factors_long.weight", np.array(long, dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(short, dtype=np.float32))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in hf.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
        if key in top:
            w.add_tensor(top[key], data)
            continue
        _, _, layer, rest = key.split(".", 3)
        w.add_tensor(f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ids = np.random.RandomState(0).randint(0, len(tokens), (1, 40))
    ours = load_model(str(tmp_path / "phi3.gguf"), dtype="float32").model
    assert np.abs(np.array(ours(mx.array(ids))) - reference(hf, ids)).max() < TOL
