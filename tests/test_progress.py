"""Progress bars (stratlm.progress): training, validation, heal and conversion draw a bar with a
total, a rate and an ETA on stderr when asked, and write nothing when not; the settings' order
(the call, STRATLM_PROGRESS, a terminal); the hub's own download bars are left on."""

from __future__ import annotations

import io
import re

import pytest

from stratlm import progress
from stratlm.loaders.convert import convert
from stratlm.loaders.loading import save_model
from stratlm.testing import tiny_model
from stratlm.training.data import from_records
from stratlm.training.finetune import finetune
from stratlm.training.trainer import TrainConfig
from stratlm.transforms.collapse import collapse
from stratlm.transforms.dora import AdapterConfig
from stratlm.transforms.heal import heal_model

RECORDS = [{"prompt": f"colour {c}", "completion": f"<{c}>"} for c in ["red", "blue", "green", "pink", "gray", "teal", "navy", "gold"]]


def frames(err: str, desc: str) -> list[str]:
    """The frames a bar drew (tqdm separates them with carriage returns when the stream is not a terminal)."""
    return [f.strip() for f in re.split(r"[\r\n]", err) if f.strip().startswith(f"{desc}:")]


def assert_finished_bar(err: str, desc: str, total: int, unit: str) -> str:
    """The last frame of `desc`'s bar shows total/total, the elapsed time, an ETA and a rate in `unit`s."""
    shown = frames(err, desc)
    assert shown, f"no {desc!r} bar in {err!r}"
    last = shown[-1]
    pattern = rf"{desc}: 100%\|.*\| {total}/{total} \[\d\d:\d\d elapsed, ETA \d\d:\d\d, +[\d.]+ ?(s/{unit}|{unit}/s)"
    assert re.search(pattern, last), last
    return last


@pytest.fixture(scope="module")
def data():
    return from_records(RECORDS, tiny_model("llama", seed=0).tokenizer)


def train(data, **kwargs):
    config = TrainConfig(steps=3, batch_size=2, warmup_steps=1, report_every=3, learning_rate=1e-3)
    return finetune(tiny_model("llama", seed=0), data, valid_fraction=0.25, adapter=AdapterConfig(rank=2), train=config, on_progress=None, **kwargs)


def test_training_draws_steps_loss_tokens_per_second_and_validation(data, capsys):
    train(data, progress_bar=True)
    err = capsys.readouterr().err
    last = assert_finished_bar(err, "train", 3, "step")
    assert re.search(r"loss \d+\.\d+, val \d+\.\d+, [\d,]+ tok/s\]$", last), last
    assert not re.search(r"\b0 tok/s", last)  # validation time is not counted as training time
    assert frames(err, "validation") and "/1 [" in frames(err, "validation")[0]  # 2 held-out examples, batch 2: one batch, counted up front


def test_no_bar_when_off_by_call_or_environment_or_not_a_terminal(data, capsys, monkeypatch):
    train(data, progress_bar=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("STRATLM_PROGRESS", "off")
    train(data)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("STRATLM_PROGRESS")
    train(data)  # pytest's captured stderr is not a terminal: tqdm's convention, no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("STRATLM_PROGRESS", "on")
    train(data)
    assert_finished_bar(capsys.readouterr().err, "train", 3, "step")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_call_wins_then_the_environment_then_a_terminal(monkeypatch):
    monkeypatch.delenv("STRATLM_PROGRESS", raising=False)
    assert progress.enabled(None, Terminal()) and not progress.enabled(None, io.StringIO())
    monkeypatch.setenv("STRATLM_PROGRESS", "Off")
    assert not progress.enabled(None, Terminal()) and progress.enabled(True, Terminal())
    monkeypatch.setenv("STRATLM_PROGRESS", "1")
    assert progress.enabled(None, io.StringIO()) and not progress.enabled(False, io.StringIO())
    monkeypatch.setenv("STRATLM_PROGRESS", "sometimes")  # not an on/off word: as if unset
    assert not progress.enabled(None, io.StringIO())


def test_heal_draws_the_teacher_texts_and_the_steps(capsys):
    teacher = tiny_model("llama", seed=0, num_hidden_layers=4)
    collapsed = collapse(teacher, mode="drop", n=1)
    capsys.readouterr()
    heal_model(collapsed, prompts=3, max_tokens=4, steps=2, batch_size=2, on_progress=None, progress_bar=True)
    err = capsys.readouterr().err
    assert_finished_bar(err, "teacher texts", 3, "text")
    assert_finished_bar(err, "heal", 2, "step")
    heal_model(collapsed, prompts=3, max_tokens=4, steps=2, batch_size=2, on_progress=None, progress_bar=False)
    assert capsys.readouterr().err == ""


def test_convert_draws_a_bar_per_tensor(tmp_path, capsys):
    from mlx.utils import tree_flatten

    from stratlm.loaders.loading import load_model

    save_model(tiny_model("llama", seed=4, hidden_size=128, intermediate_size=256), tmp_path / "fp32")
    capsys.readouterr()
    convert(str(tmp_path / "fp32"), tmp_path / "q4", quantize="4", progress=None, progress_bar=True)
    err = capsys.readouterr().err
    written = load_model(str(tmp_path / "q4"), dtype="float32", quantized="keep").model
    assert written.config["quantization"]["bits"] == 4
    assert_finished_bar(err, "quantizing", len(tree_flatten(written.parameters())), "tensor")  # weights, scales, biases, norms
    convert(str(tmp_path / "fp32"), tmp_path / "q8", quantize="8", progress=None, progress_bar=False)
    assert capsys.readouterr().err == ""


def test_gguf_requantizing_draws_a_bar_per_tensor(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("torch")
    from test_gguf import tiny_hf, write_gguf

    from stratlm.loaders.gguf_file import read_gguf

    source = tmp_path / "tiny.gguf"
    write_gguf(source, tiny_hf("llama", seed=5), "llama", gguf.GGMLQuantizationType.Q8_0)
    capsys.readouterr()
    convert(str(source), tmp_path / "tiny-Q4_K_M.gguf", quantize="q4_k_m", progress=None, progress_bar=True)
    assert_finished_bar(capsys.readouterr().err, "re-quantizing", len(read_gguf(source).tensors), "tensor")


def test_hub_downloads_keep_huggingface_hub_bars():
    """stratlm never turns off huggingface_hub's own download bars (HF_HUB_DISABLE_PROGRESS_BARS does)."""
    import os

    from huggingface_hub.utils import are_progress_bars_disabled

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set here")

    import stratlm.cli.main  # noqa: F401
    import stratlm.loaders.hub  # noqa: F401
    from stratlm.core.log import configure

    configure(verbose=False)
    assert not are_progress_bars_disabled()


def test_the_command_line_is_not_silent_while_healing_in_a_terminal(tmp_path, monkeypatch):
    """`stratlm generate -t collapse -t heal` with stderr on a terminal (and nothing set): bars for
    the teacher's texts and the heal steps, as Engine(transforms=["collapse", "heal"]) applies them."""
    from stratlm.cli.main import main

    monkeypatch.delenv("STRATLM_PROGRESS", raising=False)
    save_model(tiny_model("llama", seed=0, num_hidden_layers=4), tmp_path / "tiny")
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    code = main(["generate", "hi", "--model", str(tmp_path / "tiny"), "--max-tokens", "2", "--quiet",
                 "-t", "collapse:n=1", "-t", "heal:steps=2,prompts=2,max_tokens=4,batch_size=2"])
    assert code == 0, terminal.getvalue()
    assert_finished_bar(terminal.getvalue(), "teacher texts", 2, "text")
    assert_finished_bar(terminal.getvalue(), "heal", 2, "step")
