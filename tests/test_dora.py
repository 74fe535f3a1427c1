"""DoRA/LoRA adapters: identity at init, fuse, save/load, mlx-lm interchange, QDoRA, bad input."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from hypothesis import given, settings
from hypothesis import strategies as st

from stratlm import Engine
from stratlm.core.errors import ConfigError, ModelLoadError
from stratlm.backends.cpu import kernels
from stratlm.loaders.loading import save_model
from stratlm.specs import parse_transform_specs
from stratlm.backends.cpu.quantized import KernelQuantizedLinear, adopt
from stratlm.testing import tiny_model
from stratlm.transforms.dora import (
    AdapterConfig,
    DoRALinear,
    LoRALinear,
    adapter_layers,
    add_adapters,
    copy_loaded,
    fuse,
    save_adapter,
    with_adapter,
)

TOKENS = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


def trained_like(loaded, config=AdapterConfig(rank=4), seed=1):
    """A copy with adapters whose B and m moved away from their initial values (as training would)."""
    result = copy_loaded(loaded)
    add_adapters(result.model, config)
    mx.random.seed(seed)
    for _, layer in adapter_layers(result.model):
        layer.lora_b = 0.02 * mx.random.normal(layer.lora_b.shape)
        if isinstance(layer, DoRALinear):
            layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    mx.eval(result.model.parameters())
    return result


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_fresh_adapter_leaves_logits_unchanged(family, kind):
    base = tiny_model(family, seed=0)
    adapted = copy_loaded(base)
    wrapped = add_adapters(adapted.model, AdapterConfig(rank=4, fine_tune_type=kind))
    assert len(wrapped) == 7 * 2  # every attention and MLP projection of both blocks
    assert mx.array_equal(adapted.model(TOKENS), base.model(TOKENS))
    # the base model was not touched, and only the adapters train
    assert not adapter_layers(base.model)
    trainable = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(adapted.model.trainable_parameters())}
    assert trainable == ({"lora_a", "lora_b", "m"} if kind == "dora" else {"lora_a", "lora_b"})


@settings(max_examples=6)
@given(rank=st.integers(1, 8), scale=st.floats(0.5, 30.0), seed=st.integers(0, 10_000), kind=st.sampled_from(["dora", "lora"]))
def test_fused_equals_unfused(rank, scale, seed, kind):
    base = tiny_model("llama", seed=0)
    adapted = trained_like(base, AdapterConfig(rank=rank, scale=scale, fine_tune_type=kind), seed=seed)
    fused = fuse(adapted)
    assert not adapter_layers(fused.model)
    assert all(type(m) is nn.Linear for _, m in fused.model.named_modules() if "proj" in _)
    expected = adapted.model(TOKENS)
    assert not mx.allclose(expected, base.model(TOKENS), atol=1e-3)  # the adapter does something
    assert mx.allclose(fused.model(TOKENS), expected, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_is_exact(tmp_path):
    base = tiny_model("llama", seed=0)
    config = AdapterConfig(rank=4, layers=[1], keys=["q_proj", "v_proj"])
    adapted = trained_like(base, config)
    save_adapter(adapted.model, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "dora"
    assert saved["num_layers"] == 1
    assert saved["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    assert set(mx.load(str(tmp_path / "adapters.safetensors"))) == {
        f"model.layers.1.self_attn.{p}.{leaf}" for p in ("q_proj", "v_proj") for leaf in ("lora_a", "lora_b", "m")
    }
    reloaded = with_adapter(base, tmp_path)
    assert mx.array_equal(reloaded.model(TOKENS), adapted.model(TOKENS))
    # through the load_adapter hook: unfused on request (exact), merged into the base weights by default
    engine = Engine(base, adapter=tmp_path, fuse_adapter=False)
    assert mx.array_equal(engine.model(TOKENS), adapted.model(TOKENS))
    assert engine.generate("hi", max_tokens=4).token_ids == Engine(adapted).generate("hi", max_tokens=4).token_ids
    fused = Engine(base, adapter=tmp_path)
    assert not adapter_layers(fused.model) and mx.allclose(fused.model(TOKENS), adapted.model(TOKENS), atol=1e-4)


def test_mlx_lm_adapters_load_in_stratlm_and_ours_in_mlx_lm(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    base = tiny_model("llama", seed=0, num_hidden_layers=3)
    save_model(base, tmp_path / "base")

    # mlx-lm's own code makes and saves a DoRA adapter (as its trainer does) ...
    theirs, _ = mlx_lm_load_model(tmp_path / "base")
    theirs.freeze()
    linear_to_lora_layers(theirs, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0}, use_dora=True)
    mx.random.seed(3)
    theirs.load_weights([(k, v + 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(theirs.trainable_parameters())], strict=False)
    (tmp_path / "theirs").mkdir()
    mx.save_safetensors(str(tmp_path / "theirs" / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "model": "x", "iters": 10}))
    theirs.eval()
    ours = Engine(base, adapter=tmp_path / "theirs", fuse_adapter=False)
    assert mx.allclose(ours.model(TOKENS), theirs(TOKENS), atol=1e-6)

    # ... and mlx-lm loads ours
    config = AdapterConfig(rank=4, num_layers=2, keys=["o_proj", "down_proj", "gate_proj"])
    adapted = trained_like(base, config)
    save_adapter(adapted.model, tmp_path / "ours", config)
    fresh, _ = mlx_lm_load_model(tmp_path / "base")
    load_adapters(fresh, str(tmp_path / "ours"))
    fresh.eval()
    assert mx.allclose(fresh(TOKENS), adapted.model(TOKENS), atol=1e-6)


def test_qdora_over_a_quantized_base(exact_kernels):
    base = tiny_model("llama", seed=0)
    nn.quantize(base.model, group_size=32, bits=4)
    adapted = copy_loaded(base)
    add_adapters(adapted.model, AdapterConfig(rank=4))
    assert mx.allclose(adapted.model(TOKENS), base.model(TOKENS), atol=1e-5)
    adapted = trained_like(base, AdapterConfig(rank=4))
    assert isinstance(adapter_layers(adapted.model)[0][1].linear, nn.QuantizedLinear)
    dense = fuse(adapted, dequantize=True)
    assert mx.allclose(dense.model(TOKENS), adapted.model(TOKENS), atol=1e-4)
    requantized = fuse(adapted)  # stays 4-bit: close, not equal
    quantized = [m for _, m in requantized.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized
    if kernels.available():  # on the CPU the re-quantized layers run on stratlm's kernels again, as loaded ones do
        assert all(isinstance(m, KernelQuantizedLinear) for m in quantized)
        on_mlx = copy_loaded(requantized)
        on_mlx.model.update_modules(tree_unflatten([(p, adopt(nn.QuantizedLinear, m)) for p, m in on_mlx.model.named_modules()
                                                    if isinstance(m, KernelQuantizedLinear)]))
        assert mx.allclose(requantized.model(TOKENS), on_mlx.model(TOKENS), atol=1e-4)


def test_bad_adapter_settings_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match="rank must be a positive integer, got 0"):
        AdapterConfig(rank=0)
    with pytest.raises(ConfigError, match="rank must be a positive integer, got -2"):
        AdapterConfig(rank=-2)
    base = tiny_model("llama", seed=0)
    with pytest.raises(ConfigError, match="'wq'.*available: mlp.down_proj"):
        add_adapters(copy_loaded(base).model, AdapterConfig(keys=["wq"]))
    with pytest.raises(ConfigError, match=r"layer\(s\) \[5\] are outside the model"):
        add_adapters(copy_loaded(base).model, AdapterConfig(layers=[5]))
    # an adapter made for a wider model
    wide = trained_like(tiny_model("llama", seed=0, hidden_size=96, head_dim=24))
    save_adapter(wide.model, tmp_path / "wide", AdapterConfig(rank=4))
    with pytest.raises(ModelLoadError, match=r"another architecture or size: .*shape \(96, 4\) in the adapter, \(64, 4\) in the model"):
        Engine(base, adapter=tmp_path / "wide")
    deep = trained_like(tiny_model("llama", seed=0, num_hidden_layers=4))
    save_adapter(deep.model, tmp_path / "deep", AdapterConfig(rank=4))
    with pytest.raises(ModelLoadError, match=r"does not fit this model: adapter layer\(s\) \[2, 3\] are outside the model, which has blocks 0..1"):
        Engine(base, adapter=tmp_path / "deep")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    with pytest.raises(ModelLoadError, match="no installed plugin reads the adapter"):
        Engine(base, adapter=tmp_path / "full")


def test_lora_layer_class_is_mlx_lm_shaped():
    layer = LoRALinear(nn.Linear(64, 32), rank=3)
    assert layer.lora_a.shape == (64, 3) and layer.lora_b.shape == (3, 32)
    dora = DoRALinear(nn.Linear(64, 32), rank=3)
    assert dora.m.shape == (32,)


def test_adapters_on_a_model_optimized_for_inference():
    base = tiny_model("llama", seed=0)
    expected = base.model(TOKENS)
    base.model.optimize_for_inference()  # fused q/k/v and gate/up matmuls
    adapted = copy_loaded(base)
    add_adapters(adapted.model, AdapterConfig(rank=4))
    assert mx.allclose(adapted.model(TOKENS), expected, atol=1e-5)
    changed = trained_like(base)
    assert mx.allclose(fuse(changed).model(TOKENS), changed.model(TOKENS), atol=1e-4)


def test_dora_is_a_registered_transform_for_saved_and_fresh_adapters(tmp_path):
    base = tiny_model("llama", seed=0)
    config = AdapterConfig(rank=4, layers=[1], keys=["q_proj", "v_proj"])
    adapted = trained_like(base, config)
    save_adapter(adapted.model, tmp_path, config)
    # a saved adapter by name, as Engine(adapter=..., fuse_adapter=False) applies it; "fuse" then merges it
    applied = Engine(base, transforms=[("dora", {"adapter": str(tmp_path)})])
    assert mx.array_equal(applied.model(TOKENS), adapted.model(TOKENS))
    merged = Engine(base, transforms=[("dora", {"adapter": str(tmp_path)}), "fuse"])
    assert not adapter_layers(merged.model) and mx.allclose(merged.model(TOKENS), adapted.model(TOKENS), atol=1e-4)
    # fresh trainable adapters, options as the command line writes them
    fresh = Engine(base, transforms=parse_transform_specs("dora:rank=2,keys=q_proj+down_proj,layers=0,fine_tune_type=lora"))
    assert [(p, type(layer).__name__, layer.lora_a.shape[1]) for p, layer in adapter_layers(fresh.model)] == [
        ("model.layers.0.mlp.down_proj", "LoRALinear", 2), ("model.layers.0.self_attn.q_proj", "LoRALinear", 2)]
    assert mx.array_equal(fresh.model(TOKENS), base.model(TOKENS)) and not adapter_layers(base.model)
    with pytest.raises(ConfigError, match="with adapter= takes the adapter's own settings; leave out rank"):
        Engine(base, transforms=[("dora", {"adapter": str(tmp_path), "rank": 4})])
    with pytest.raises(ConfigError, match="adapter rank must be a positive integer"):
        Engine(base, transforms=[("dora", {"rank": 0})])
    # a transform's options stay its own: the strategy's options still reach the strategy
    assert Engine(base, "best-of-n", transforms=[("dora", {"rank": 2})], n=3).strategy.n == 3
