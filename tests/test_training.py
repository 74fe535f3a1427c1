"""JSONL data, the training loop (loss falls, resume after an interruption), `stratlm train dora`."""

import json

import mlx.core as mx
import pytest

from stratlm.cli.main import main
from stratlm.core.errors import ConfigError
from stratlm.testing import tiny_model
from stratlm.training.data import DataError, batch_arrays, from_records, load_jsonl, micro_batch, write_jsonl
from stratlm.transforms.dora import AdapterConfig, adapter_weights
from stratlm.training.finetune import finetune
from stratlm.training.trainer import TrainConfig

COLOURS = ["red", "blue", "green", "pink", "gray", "teal", "navy", "gold"]
RECORDS = [{"prompt": f"colour {c}", "completion": f"<{c}>"} for c in COLOURS]


def learned_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example.tokens, example.loss_mask) if m])


def test_formats_put_the_loss_on_completions_and_assistant_turns(tiny):
    tok = tiny.tokenizer
    chat = from_records([
        {"prompt": "colour red", "completion": "<red>"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]},
        {"text": "plain words"},
    ], tok)
    assert learned_text(tok, chat.examples[0]) == "<red><|im_end|>\n"
    assert learned_text(tok, chat.examples[1]) == "yo<|im_end|>\nok<|im_end|>\n"
    assert learned_text(tok, chat.examples[2]) == "plain words<|im_end|>"
    everything = from_records([{"prompt": "colour red", "completion": "<red>"}], tok, train_on_prompt=True).examples[0]
    assert all(everything.loss_mask) and everything.tokens == chat.examples[0].tokens


def test_bad_lines_name_their_number_and_are_skipped_or_stop(tiny, tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(RECORDS[:2], path)
    with path.open("a") as fh:
        fh.write('{"prompt": "x", "completion"\n\n{"question": "no fields"}\n')
    data = load_jsonl(path, tiny.tokenizer)
    assert len(data) == 2
    assert data.skipped[0].endswith("line 3: not valid JSON (Expecting ':' delimiter)")
    assert "line 5: a record needs 'prompt' and 'completion', 'messages', or 'text'; it has 'question'" in data.skipped[1]
    with pytest.raises(DataError, match=r"data.jsonl line 3: not valid JSON"):
        load_jsonl(path, tiny.tokenizer, on_error="stop")
    with pytest.raises(ConfigError, match="dataset file not found"):
        load_jsonl(tmp_path / "missing.jsonl", tiny.tokenizer)
    with pytest.raises(ConfigError, match="on_error must be 'skip' or 'stop', got 'ignore'"):
        load_jsonl(path, tiny.tokenizer, on_error="ignore")


def test_batches_are_a_pure_function_of_their_index(tiny):
    data = from_records(RECORDS, tiny.tokenizer)
    first = [micro_batch(data, 3, seed=7, index=i) for i in range(7)]
    assert first == [micro_batch(data, 3, seed=7, index=i) for i in range(7)]
    epoch = [e for batch in first[:3] for e in batch]
    assert sorted(epoch, key=lambda e: e.tokens) == sorted(data.examples, key=lambda e: e.tokens)  # each example once per epoch
    tokens, weights = batch_arrays(first[0])
    assert tokens.shape[1] % 16 == 0 and weights[:, -1].sum() == 0


def test_tiny_model_loss_falls(tmp_path):
    base = tiny_model("llama", seed=0)
    data = from_records(RECORDS * 2, base.tokenizer)
    progress = []
    result = finetune(base, data, valid=from_records(RECORDS[:4], base.tokenizer), adapter=AdapterConfig(rank=8),
                      train=TrainConfig(steps=40, batch_size=4, learning_rate=1e-2, warmup_steps=4, report_every=10),
                      out=tmp_path / "adapter", on_progress=progress.append)
    losses = [loss for _, loss in result.training.losses]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    assert result.training.val_loss is not None and result.training.val_loss < losses[0]
    assert "tok/s" in progress[-1].line() and "ETA" in progress[-1].line() and "val" in progress[-1].line()
    assert (tmp_path / "adapter" / "adapters.safetensors").exists()
    assert not adapter_weights(base.model)  # the input model is left as it was


def test_resume_after_an_interruption_continues_at_the_same_step_with_the_same_state(tmp_path):
    base = tiny_model("llama", seed=0)
    data = from_records(RECORDS, base.tokenizer)
    adapter = AdapterConfig(rank=4, dropout=0.1)  # dropout: the random state must resume too
    config = TrainConfig(steps=6, batch_size=2, grad_accumulation=2, learning_rate=3e-3, warmup_steps=2, checkpoint_every=2)
    straight = finetune(base, data, valid_fraction=0, adapter=adapter, train=config, out=tmp_path / "straight", on_progress=None)

    class Killed(Exception):
        """The simulated interruption (a test helper, not a test)."""

    def kill_at_step_5(step):
        if step == 5:
            raise Killed  # like `kill`: nothing is saved after the step-4 checkpoint

    with pytest.raises(Killed):
        finetune(base, data, valid_fraction=0, adapter=adapter, train=config, out=tmp_path / "cut", on_progress=None, on_step=kill_at_step_5)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    saved_state = mx.load(str(tmp_path / "cut" / "checkpoint-000004" / "optimizer.safetensors"))
    steps_seen = []
    resumed = finetune(base, data, valid_fraction=0, adapter=adapter, train=config, out=tmp_path / "cut", on_progress=None,
                       resume=True, on_step=steps_seen.append)
    assert resumed.training.start_step == 4 and steps_seen == [5, 6]
    assert int(saved_state["step"].item()) == 4
    a, b = adapter_weights(straight.loaded.model), adapter_weights(resumed.loaded.model)
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"settings differ from the checkpoint's: learning_rate \(was 0.003, now 0.001\)"):
        finetune(base, data, valid_fraction=0, adapter=adapter, train=TrainConfig(steps=6, batch_size=2, grad_accumulation=2, learning_rate=1e-3,
                 warmup_steps=2, checkpoint_every=2), out=tmp_path / "cut", on_progress=None, resume=True)


def test_bad_training_settings_name_the_value():
    with pytest.raises(ConfigError, match="steps must be > 0, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"warmup_steps must be in \[0, steps=10\), got 10"):
        TrainConfig(steps=10, warmup_steps=10)


def test_cli_train_dora(tmp_path, capsys):
    base = tiny_model("llama", seed=0)
    from stratlm.loaders.loading import save_model

    save_model(base, tmp_path / "model")
    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    (tmp_path / "train.jsonl").open("a").write("not json\n")
    code = main(["train", "dora", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "ad"),
                 "--steps", "3", "--batch-size", "2", "--rank", "4", "--targets", "q_proj,v_proj", "--fuse-to", str(tmp_path / "fused")])
    assert code == 0
    out = capsys.readouterr().out
    assert "trained steps 0..3" in out and "fused model" in out
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    code = main(["train", "dora", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "ad2"),
                 "--steps", "3", "--stop-on-bad-lines"])
    assert code == 1
    assert "train.jsonl line 9: not valid JSON" in capsys.readouterr().err
    assert main(["train", "dora", "--data", str(tmp_path / "train.jsonl"), "--rank", "0", "--model", str(tmp_path / "model")]) == 1
    assert "rank must be a positive integer, got 0" in capsys.readouterr().err
