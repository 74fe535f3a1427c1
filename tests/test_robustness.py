"""Bad input and lost work (issue 13): every case ends in a StratlmError naming the problem, never a
traceback, an "unexpected" line or a training run overwritten by another."""

import json
import shutil

import mlx.core as mx
import pytest

from stratlm.core.errors import ConfigError, StratlmError
from stratlm.testing import tiny_model
from stratlm.training.data import DataError, from_records, load_jsonl, write_jsonl
from stratlm.training.finetune import finetune
from stratlm.training.trainer import CheckpointError, TrainConfig, Trainer, masked_cross_entropy
from stratlm.transforms.dora import AdapterConfig, add_adapters, adapter_weights

RECORDS = [{"prompt": f"colour {c}", "completion": f"<{c}>"} for c in ["red", "blue", "green", "pink", "gray", "teal"]]
SMALL = TrainConfig(steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=0, checkpoint_every=1)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", seed=0)


def train(base, out, records=RECORDS, config=SMALL, adapter=AdapterConfig(rank=4), **kwargs):
    return finetune(base, from_records(records, base.tokenizer), valid_fraction=0, adapter=adapter, train=config, out=out,
                    on_progress=None, **kwargs)


# -- training: a used --out, resume checks, rotation, write errors -------------------------------------
def test_new_run_into_a_used_out_refuses_unless_overwrite(base, tmp_path):
    out = tmp_path / "ad"
    first = train(base, out)
    before = mx.load(str(out / "adapters.safetensors"))
    with pytest.raises(ConfigError, match=r"already holds another training run \(checkpoint-000003, checkpoint-000004.*--resume.*--overwrite"):
        train(base, out, records=RECORDS[:4])
    after = mx.load(str(out / "adapters.safetensors"))
    assert all(mx.array_equal(before[k], after[k]) for k in before)  # nothing of the first run was touched
    second = train(base, out, records=RECORDS[:4], overwrite=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004"]
    state = json.loads((out / "checkpoint-000004" / "trainer_state.json").read_text())
    assert state["fingerprint"]["training data"].startswith("4 examples")
    a, b = adapter_weights(first.loaded.model), adapter_weights(second.loaded.model)
    assert any(not mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="pass one of them"):
        train(base, out, resume=True, overwrite=True)


@pytest.mark.parametrize("change, named", [
    (dict(records=RECORDS[:5]), r"training data \(was '6 examples, sha256 \w+', now '5 examples"),
    (dict(adapter=AdapterConfig(rank=2)), r"adapter.rank \(was 4, now 2\)"),
    (dict(model_seed=1), r"model \(was '\d+ tensors"),
])
def test_resume_refuses_other_data_model_or_settings_and_names_them(base, tmp_path, change, named):
    out = tmp_path / "ad"
    cut = TrainConfig(steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=0, checkpoint_every=2)

    def stop_at_3(step):
        if step == 3:
            raise KeyboardInterrupt  # Ctrl-C: saves the finished steps

    with pytest.raises(KeyboardInterrupt):
        train(base, out, config=cut, on_step=stop_at_3)
    model = tiny_model("llama", seed=change.pop("model_seed")) if "model_seed" in change else base
    with pytest.raises(ConfigError, match=r"cannot resume from .*checkpoint-000003: the run differs from the checkpoint's: " + named):
        train(model, out, config=cut, resume=True, **change)
    resumed = train(base, out, config=cut, resume=True)  # the same run resumes
    assert resumed.training.start_step == 3


def test_resume_refuses_a_checkpoint_without_a_fingerprint(base, tmp_path):
    out = tmp_path / "ad"
    cut = TrainConfig(steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=0, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(base, out, config=cut, on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 3 else None)
    state_file = out / "checkpoint-000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"], state["run_id"]  # as an older stratlm wrote it
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="written without a record of its data, model and settings"):
        train(base, out, config=cut, resume=True)


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    out = tmp_path / "ad"
    # another run's checkpoint at a later step (an older stratlm let two runs share a folder): it must survive
    (out / "checkpoint-000120").mkdir(parents=True)
    (out / "checkpoint-000120" / "trainer_state.json").write_text(json.dumps({"step": 120, "run_id": "another run"}))
    model = tiny_model("llama", seed=0).model
    add_adapters(model, AdapterConfig(rank=4))
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    trainer = Trainer(model, masked_cross_entropy, lambda i: (tokens, mx.ones(tokens.shape)), SMALL, out=out, on_progress=None)
    trainer.run()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004", "checkpoint-000120"]


def test_an_unwritable_out_names_the_path(base, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"cannot write .*a-file.*: Not a directory"):
        train(base, blocker / "ad")
    out = tmp_path / "ad"

    def disk_gone(step):
        if step == 2:  # the folder becomes a file mid-run, as a full or vanished disk would fail the write
            shutil.rmtree(out)
            out.write_text("in the way")

    with pytest.raises(CheckpointError, match=r"cannot write .*ad.*(Not a directory|File exists)"):
        train(base, out, on_step=disk_gone)


def test_invalid_utf8_in_jsonl_names_the_line(base, tmp_path):
    path = write_jsonl(RECORDS, tmp_path / "train.jsonl")
    with path.open("ab") as fh:
        fh.write(b'{"text": "caf\xe9 latte"}\n')
    data = load_jsonl(path, base.tokenizer)
    assert len(data) == len(RECORDS) and "line 7: not valid UTF-8 (byte 0xe9 at column 14)" in data.skipped[0]
    with pytest.raises(DataError, match="train.jsonl line 7: not valid UTF-8"):
        load_jsonl(path, base.tokenizer, on_error="stop")
