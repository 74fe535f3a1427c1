"""collapse: identity at zero blocks, drop/merge/tie, choice by angular distance, footprints, saved folders reload."""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest

from stratlm import Engine
from stratlm.cli.main import main
from stratlm.core.errors import ConfigError
from stratlm.loaders.loading import load_model, save_model
from stratlm.testing import tiny_model
from stratlm.transforms.dora import copy_loaded
from stratlm.transforms.collapse import angular_distance, choose_run, collapse, collapse_report, footprint, origin_of, run_distances

TOKENS = mx.array([[5, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


@pytest.fixture(scope="module")
def six():
    return tiny_model("llama", seed=0, num_hidden_layers=6)


def test_collapsing_zero_blocks_is_the_identity(six):
    for mode in ("drop", "merge", "tie"):
        same = collapse(six, mode=mode, n=0)
        assert len(same.model.layers) == 6
        assert mx.array_equal(same.model(TOKENS), six.model(TOKENS))


@pytest.mark.parametrize("mode,blocks,distinct", [("drop", 4, 4), ("merge", 5, 5), ("tie", 6, 5)])
def test_modes_and_the_saved_folder_reloads_identically(six, tmp_path, mode, blocks, distinct):
    before = six.model(TOKENS)
    result = collapse(six, mode=mode, start=2, n=2)
    assert len(result.model.layers) == blocks == result.model.config["num_hidden_layers"]
    assert len({id(b) for b in result.model.layers}) == distinct
    assert len(six.model.layers) == 6 and mx.array_equal(six.model(TOKENS), before)  # the original keeps its blocks
    logits = result.model(TOKENS)
    # with a KV cache, token by token, the same logits
    cache = result.model.make_cache()
    stepwise = mx.concatenate([result.model(TOKENS[:, i : i + 1], cache) for i in range(TOKENS.shape[1])], axis=1)
    assert mx.allclose(stepwise, logits, atol=1e-5)
    save_model(result, tmp_path / mode)
    reloaded = load_model(str(tmp_path / mode))
    assert len(reloaded.model.layers) == blocks
    assert mx.array_equal(reloaded.model(TOKENS), logits)
    if mode == "drop":  # mlx-lm reads the folder too
        mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
        theirs, _ = mlx_lm_utils.load_model(tmp_path / mode)
        assert mx.allclose(theirs(TOKENS), logits, atol=1e-5)


def test_merge_averages_and_drop_skips(six):
    merged = collapse(six, mode="merge", start=1, n=3)
    want = (six.model.layers[1].mlp.up_proj.weight + six.model.layers[2].mlp.up_proj.weight + six.model.layers[3].mlp.up_proj.weight) / 3
    assert mx.allclose(merged.model.layers[1].mlp.up_proj.weight, want, atol=1e-7)
    dropped = collapse(six, mode="drop", layers="1:4")
    assert mx.array_equal(dropped.model.layers[1].mlp.up_proj.weight, six.model.layers[4].mlp.up_proj.weight)
    assert origin_of(dropped.model).block_map == (0, 4, 5)


def test_the_run_is_chosen_by_smallest_angular_distance(six):
    distances = run_distances(six, 2)
    assert len(distances) == 5 and all(0 <= d <= 1 for d in distances)
    start, distance = choose_run(six, 2)
    assert 1 <= start <= 3 and distance == min(distances[1:4])
    # the measurement itself: the hidden states entering and leaving the run, by hand
    states = six.model.hidden_states(TOKENS)
    a, b = states[start], states[start + 2]
    cos = (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1))
    assert mx.allclose(angular_distance(a, b), mx.arccos(cos) / math.pi, atol=1e-5)
    chosen = collapse(six, n=2)
    assert origin_of(chosen.model).start == start and origin_of(chosen.model).distance == distance


def test_report_counts_parameters_blocks_kv_bytes_and_compute(six):
    result = collapse(six, mode="drop", start=2, n=3)
    report = collapse_report(six.model, result.model)
    b, a = report["before"], report["after"]
    per_block = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128  # q, k, v, o + gate, up, down
    assert a["blocks"] == 3 and b["blocks"] == 6
    assert b["kv_bytes_per_token"] == 2 * 6 * 2 * 16 * 4 and a["kv_bytes_per_token"] == b["kv_bytes_per_token"] // 2
    assert b["flops_per_token"] - a["flops_per_token"] == 2 * 3 * per_block
    assert b["parameters"] - a["parameters"] == 3 * (per_block + 2 * 64)  # and the two norms
    tied = collapse(six, mode="tie", start=2, n=3)
    assert footprint(tied.model).parameters == b["parameters"] - 2 * (per_block + 2 * 64)
    assert footprint(tied.model).flops_per_token == b["flops_per_token"]
    # a quantized copy has as many parameters (its weights counted as the values they pack)
    quantized = copy_loaded(six)
    nn.quantize(quantized.model, group_size=32, bits=4)
    assert footprint(quantized.model) == footprint(six.model)


def test_bad_ranges_and_modes_name_the_value(six):
    with pytest.raises(ConfigError, match=r"collapse range 4:8 is outside the model, which has blocks 0..5"):
        collapse(six, start=4, n=4)
    with pytest.raises(ConfigError, match=r"collapse range -1:1 is outside the model"):
        collapse(six, layers="-1:1")
    with pytest.raises(ConfigError, match="layers must be 'start:end'.*got '3-5'"):
        collapse(six, layers="3-5")
    with pytest.raises(ConfigError, match="mode must be one of drop, merge, tie, got 'squash'"):
        collapse(six, mode="squash")
    with pytest.raises(ConfigError, match="integer >= 0, got -2"):
        collapse(six, n=-2)
    with pytest.raises(ConfigError, match="cannot choose 5 blocks"):
        collapse(six, n=5)


def test_collapse_by_name_in_engine_and_cli(six, tmp_path, capsys):
    engine = Engine(six, transforms=[("collapse", {"n": 2, "start": 1})])
    assert len(engine.model.layers) == 4 and len(six.model.layers) == 6
    assert engine.generate("hi", max_tokens=3).finish_reason in ("stop", "length")
    save_model(six, tmp_path / "six")
    assert main(["transform", str(tmp_path / "six"), "collapse:n=2,mode=merge", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "collapse: merge blocks" in printed and "KV-cache bytes/token" in printed
    assert len(load_model(str(tmp_path / "out")).model.layers) == 5
    assert main(["transform", str(tmp_path / "six"), "colapse", "--out", str(tmp_path / "bad")]) == 1
    assert "unknown transform 'colapse'. Did you mean 'collapse'?" in capsys.readouterr().err
