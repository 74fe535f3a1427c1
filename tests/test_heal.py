"""heal: distillation recovers the teacher on held-out text; composition by name; the "self" draft."""

import mlx.core as mx
import pytest

from stratlm import Engine
from stratlm.core.errors import ConfigError
from stratlm.loaders.loading import load_model, save_model
from stratlm.testing import tiny_model
from stratlm.transforms.collapse import collapse, origin_of
from stratlm.transforms.dora import adapter_layers
from stratlm.transforms.heal import compare_to_teacher, heal, heal_model, self_distillation_data, trainable_window

TOKENS = mx.array([[5, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", seed=0, num_hidden_layers=6)


@pytest.fixture(scope="module")
def sharp():
    loaded = tiny_model("llama", seed=0, num_hidden_layers=6)
    # larger embeddings (tied head): well-separated logits, so argmax comparisons are not decided by rounding
    loaded.model.model.embed_tokens.weight = loaded.model.model.embed_tokens.weight * 4
    return loaded


def test_healing_recovers_the_teacher_on_held_out_text(teacher, tmp_path):
    train, heldout = self_distillation_data(teacher, n_train=16, n_heldout=4, max_tokens=24, seed=0)
    assert len(train) == 16 and len(heldout) == 4 and all(len(e) > 24 for e in heldout.examples)
    collapsed = collapse(teacher, mode="drop", n=2)
    healed = heal_model(collapsed, data=train, steps=30, learning_rate=1e-3, hidden_weight=0.5, on_progress=None)
    start = origin_of(collapsed.model).start
    assert healed.window == tuple(range(max(0, start - 2), min(4, start + 2)))
    assert not adapter_layers(healed.loaded.model)  # fused: an ordinary model again
    before = compare_to_teacher(collapsed, teacher, heldout)
    after = compare_to_teacher(healed.loaded, teacher, heldout)
    assert compare_to_teacher(teacher, teacher, heldout).kl == pytest.approx(0, abs=1e-6)
    assert after.kl < 0.5 * before.kl, (before, after)
    assert after.top1 > before.top1
    assert len(collapsed.model.layers) == 4 and not adapter_layers(collapsed.model)  # the input is left as it was
    save_model(healed.loaded, tmp_path / "healed")
    assert mx.array_equal(load_model(str(tmp_path / "healed")).model(TOKENS), healed.loaded.model(TOKENS))


def test_tied_blocks_get_one_adapter(teacher):
    tied = collapse(teacher, mode="tie", start=2, n=2)
    window = trainable_window(tied.model, origin_of(tied.model), around=1)
    assert window == [1, 2, 4]  # block 3 is block 2 again


def test_collapse_then_heal_by_name(teacher):
    options = {"prompts": 8, "max_tokens": 16, "steps": 4}
    engine = Engine(teacher, transforms=[("collapse", {"n": 2}), ("heal", options)])
    assert len(engine.model.layers) == 4
    assert engine.generate("hello", max_tokens=4).token_ids
    with pytest.raises(ConfigError, match="heal needs a teacher: run collapse before it"):
        heal(teacher, **options)
    with pytest.raises(ConfigError, match="around must be >= 1"):
        heal(collapse(teacher, n=1), around=0)


def test_self_draft_speculative_equals_greedy(sharp):
    greedy = Engine(sharp).generate("tell me", max_tokens=24, ignore_eos=True)
    speculative = Engine(sharp, strategy="speculative", draft="self:collapse")
    result = speculative.generate("tell me", max_tokens=24, ignore_eos=True)
    assert result.token_ids == greedy.token_ids
    assert len(speculative.strategy.draft.model.layers) < len(sharp.model.layers)


def test_self_draft_takes_transform_options(sharp):
    speculative = Engine(sharp, strategy="speculative", draft="self:collapse:n=3,start=1")
    assert len(speculative.strategy.draft.model.layers) == len(sharp.model.layers) - 3
    greedy = Engine(sharp).generate("tell me", max_tokens=12, ignore_eos=True)
    assert speculative.generate("tell me", max_tokens=12, ignore_eos=True).token_ids == greedy.token_ids
    with pytest.raises(ConfigError, match="'n=3' comes before any transform name"):
        Engine(sharp, strategy="speculative", draft="self:n=3,collapse")


def test_transform_specs_parse_names_options_and_their_values():
    from stratlm.specs import parse_transform_specs

    assert parse_transform_specs("collapse,heal") == [("collapse", {}), ("heal", {})]
    assert parse_transform_specs("collapse:n=24,mode=drop, heal:steps=30,learning-rate=1e-4") == [
        ("collapse", {"n": 24, "mode": "drop"}), ("heal", {"steps": 30, "learning_rate": 1e-4})]
    assert parse_transform_specs("collapse:layers=2:5") == [("collapse", {"layers": "2:5"})]
    with pytest.raises(ConfigError, match="transform option of collapse 'n' is not KEY=VALUE"):
        parse_transform_specs("collapse:n")


def test_cli_transform_collapse_heal_report(teacher, tmp_path, capsys):
    from stratlm.cli.main import main

    save_model(teacher, tmp_path / "teacher")
    code = main(["transform", str(tmp_path / "teacher"), "collapse:n=2,start=2", "heal:prompts=4,max_tokens=8,steps=2",
                 "--out", str(tmp_path / "out"), "--report"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "collapse: drop blocks 2:4" in printed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("original ", "+collapse ", "+heal "))}
    assert set(rows) == {"original", "+collapse", "+heal"} and "100.0%" in rows["original"]
    reloaded = load_model(str(tmp_path / "out"))
    assert len(reloaded.model.layers) == 4
