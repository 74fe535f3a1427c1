"""Bad input and lost work (issue 13): every case ends in a StratlmError naming the problem, never a
traceback, an "unexpected" line or a training run overwritten by another."""

import json
import math
import shutil

import mlx.core as mx
import pytest

from stratlm.core.errors import ConfigError
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


# -- the Python API: wrong types and values name the argument -------------------------------------
@pytest.fixture(scope="module")
def engine(base):
    from stratlm import Engine

    return Engine(base)


BAD_GENERATE = [
    (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
    (dict(temperature=math.inf), "temperature must be a finite number, got inf"),
    (dict(temperature=math.nan), "temperature must be a finite number, got nan"),
    (dict(temperature=True), "temperature must be a finite number, got True"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(top_k="5"), "top_k must be an integer, got '5'"),
    (dict(top_p="x"), "top_p must be a finite number"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=1.5), "seed must be an integer.*got 1.5"),
    (dict(seed="42"), "seed must be an integer.*got '42'"),
    (dict(seed=2**64), "seed must be an integer.*got 18446744073709551616"),
    (dict(stop=5), "stop must be a string or a list of strings, got int"),
    (dict(stop=[5]), "stop strings must be non-empty strings"),
    (dict(max_tokens="5"), "max_tokens must be a positive integer, got '5'"),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number, got inf"),
    (dict(presence_penalty=math.inf), "presence_penalty must be a finite number, got inf"),
    (dict(frequency_penalty=math.nan), "frequency_penalty must be a finite number, got nan"),
    (dict(logit_bias={0: math.inf}), r"logit_bias values must be numbers in \[-100, 100\]"),
    (dict(logprobs="yes"), "logprobs must be True or False"),
    (dict(temprature=0.5), "unknown generation argument 'temprature' \\(did you mean 'temperature'\\?\\)"),
    (dict(chat_template_kwargs=[1]), "chat_template_kwargs must be a dict with string keys"),
    (dict(chat_template="yes"), "chat_template must be True, False or None"),
    (dict(system=5), "the system message must be a string, got int"),
]


@pytest.mark.parametrize("kwargs, message", BAD_GENERATE, ids=[next(iter(k)) + "=" + repr(v)[:12] for k, _ in BAD_GENERATE for v in k.values()])
def test_bad_generation_arguments_name_the_argument(engine, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        engine.generate("hi", **kwargs)
    with pytest.raises(ConfigError, match=message):  # the stream checks before the first piece is asked for
        engine.stream("hi", **kwargs)


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": 5}], "message 0's content must be a string, got int"),
    ([{"role": "user", "content": None}], "message 0's content must be a string, got NoneType"),
    ([{"role": 5, "content": "hi"}], "message 0's role must be a string"),
    (b"hi", r"got bytes \(decode bytes first"),
    (5, "a prompt is a string or a list of chat messages"),
    ("caf\udce9", r"the prompt is not valid UTF-8 text \(byte 0xe9 at character 4\)"),
    ([{"role": "user", "content": "caf\udce9"}], "message 0's content is not valid UTF-8 text"),
])
def test_bad_prompts_name_the_problem(engine, prompt, message):
    with pytest.raises(ConfigError, match=message):
        engine.generate(prompt, max_tokens=2)


@pytest.mark.parametrize("args, kwargs, message", [
    ((123,), {}, "model must be an alias, hub repo id, folder or .gguf path.*got int: 123"),
    ((b"x",), {}, "model must be .*got bytes"),
    ((None,), dict(strategy=5), "strategy must be a strategy's name"),
    ((None,), dict(transforms="collapse"), r"transforms is a list, e.g. \['heal'\]"),
    ((None,), dict(transforms=[5]), r"a transform is a name or \(name, options\)"),
    ((None,), dict(transforms=[("collapse", {"foo": 1})]), "transform 'collapse' does not take option.s. foo; it accepts: mode, n, start"),
    ((None,), dict(adapter=5), "adapter must be an adapter folder's path"),
])
def test_bad_engine_arguments_name_the_argument_before_loading(args, kwargs, message):
    from stratlm import Engine

    with pytest.raises(ConfigError, match=message):  # before any model is loaded: None would load the embedded one
        Engine(*args, **kwargs)


def test_generation_stops_at_the_context_with_finish_reason_length():
    from stratlm import Engine

    small = tiny_model("llama", seed=0, max_position_embeddings=24)
    for strategy, options in [("greedy", {}), ("speculative", {"draft": "lookup"})]:
        engine = Engine(small, strategy, **options)
        _, ids = engine.render("hello", chat_template=False)
        result = engine.generate("hello", chat_template=False, max_tokens=100, ignore_eos=True)
        assert result.finish_reason == "length" and len(ids) + len(result.token_ids) == 24, (strategy, len(result.token_ids))
        streamed = "".join(engine.stream("hello", chat_template=False, max_tokens=100, ignore_eos=True))
        assert streamed == result.text and engine.last_result.finish_reason == "length"


# -- the command line as a new user drives it: one line `error: ...`, exit 1 or 2, never "unexpected" ----
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, base):
    from stratlm.loaders.loading import save_model

    root = tmp_path_factory.mktemp("cli")
    save_model(base, root / "model")
    write_jsonl(RECORDS, root / "train.jsonl")
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (root / "bad.gguf").write_bytes(b"GGUF not really")
    (root / "a-file").write_text("not a folder")
    used = root / "used"
    (used / "checkpoint-000120").mkdir(parents=True)
    (used / "checkpoint-000120" / "trainer_state.json").write_text(json.dumps({"step": 120}))
    return root


G = ["generate", "hi", "-m", "{model}"]
T = ["train", "dora", "-m", "{model}", "--data", "{root}/train.jsonl", "--steps", "2", "--batch-size", "2", "--out", "{root}/fresh"]
CLI_CASES = [
    # (argv, stdin bytes, exit code, what the error line must say)
    (["generate", "-m", "{model}"], None, 1, "no prompt given"),
    (["generate", "  ", "-m", "{model}"], None, 1, "a prompt is empty"),
    (["generate", "caf\udce9", "-m", "{model}"], None, 1, r"the prompt is not valid UTF-8 text \(byte 0xe9 at character 4\)"),
    (["generate", "-", "-m", "{model}"], b"caf\xe9 au lait", 1, r"standard input is not valid UTF-8 text \(byte 0xe9 at offset 3\)"),
    (G + ["--seed", "-1"], None, 1, r"seed must be an integer in \[0, 2\*\*64\)"),
    (G + ["--seed", str(2**64)], None, 1, "seed must be an integer"),
    (G + ["--seed", "1.5"], None, 2, "argument --seed: invalid int value: '1.5'"),
    (G + ["--temperature", "inf"], None, 1, "temperature must be a finite number, got inf"),
    (G + ["--temperature", "nan"], None, 1, "temperature must be a finite number, got nan"),
    (G + ["--temperature", "-1"], None, 1, "temperature must be >= 0"),
    (G + ["--top-k", "-3"], None, 1, "top_k must be >= 0"),
    (G + ["--top-p", "0"], None, 1, r"top_p must be in \(0, 1\]"),
    (G + ["--min-p", "1"], None, 1, r"min_p must be in \[0, 1\)"),
    (G + ["--repetition-penalty", "0"], None, 1, "repetition_penalty must be > 0"),
    (G + ["--presence-penalty", "inf"], None, 1, "presence_penalty must be a finite number"),
    (G + ["--frequency-penalty", "nan"], None, 1, "frequency_penalty must be a finite number"),
    (G + ["--logit-bias", "5=1000"], None, 1, r"logit_bias values must be numbers in \[-100, 100\]"),
    (G + ["--max-tokens", "0"], None, 1, "max_tokens must be a positive integer"),
    (G + ["--max-tokens", "x"], None, 2, "argument --max-tokens: invalid int value"),
    (G + ["--stop", ""], None, 1, "stop strings must be non-empty"),
    (G + ["--stop", "caf\udce9"], None, 1, "stop string 'caf.udce9' is not valid UTF-8 text"),
    (["transform", "nosuch", "--out", "{root}/t"], None, 1, r"name at least one transform after the model \('nosuch' was read as the model\)"),
    (G + ["--chat-template-kwargs", "{{bad"], None, 1, "--chat-template-kwargs is not valid JSON"),
    (G + ["--chat-template-kwargs", "[1]"], None, 1, "--chat-template-kwargs must be a JSON object"),
    (G + ["-s", "gredy"], None, 1, "unknown strategy 'gredy'. Did you mean 'greedy'"),
    (G + ["-o", "foo=1"], None, 1, r"strategy 'greedy' does not take option\(s\) foo"),
    (G + ["-o", "novalue"], None, 1, "'novalue' is not KEY=VALUE"),
    (G + ["-t", "colapse"], None, 1, "unknown transform 'colapse'. Did you mean 'collapse'"),
    (G + ["-t", "collapse:foo=1"], None, 1, r"transform 'collapse' does not take option\(s\) foo; it accepts: mode, n, start"),
    (["generate", "hi", "-m", "{root}/nowhere"], None, 1, "nowhere"),
    (["generate", "hi", "-m", "{root}/bad.gguf"], None, 1, "GGUF"),
    (G + ["--adapter", "{root}/nowhere"], None, 1, "is not an adapter folder"),
    (G + ["--dtype", "float8"], None, 1, "unknown dtype 'float8'"),
    (G + ["--quantized", "maybe"], None, 2, "argument --quantized: invalid choice: 'maybe'"),
    (G + ["--bogus"], None, 2, "unrecognized arguments: --bogus"),
    (["generat", "hi"], None, 2, "invalid choice: 'generat'"),
    (["chat", "-m", "{model}", "--seed", "-1"], None, 1, "seed must be an integer"),
    (["transform", "{model}", "collapse:foo=1", "--out", "{root}/t"], None, 1, r"transform 'collapse' does not take option\(s\) foo"),
    (["transform", "{model}", "--out", "{root}/t"], None, 1, "name at least one transform after the model"),
    (["train", "dora", "-m", "{model}", "--data", "{root}/missing.jsonl"], None, 1, "dataset file not found"),
    (T + ["--rank", "0"], None, 1, "rank must be a positive integer, got 0"),
    (T + ["--steps", "0"], None, 1, "steps must be > 0, got 0"),
    (T + ["--seed", "-1"], None, 1, r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (T + ["--learning-rate", "inf"], None, 1, "learning_rate must be a finite number >= 0, got inf"),
    (T + ["--report-every", "0"], None, 1, "report_every must be >= 1"),
    (T + ["--max-length", "0"], None, 1, "max_length must be >= 2 tokens"),
    (T + ["--scale", "inf"], None, 1, "adapter scale must be a finite number, got inf"),
    (T + ["--valid-fraction", "1.5"], None, 1, r"valid_fraction must be in \(0, 1\), got 1.5"),
    (T[:-1] + ["{root}/used"], None, 1, r"already holds another training run \(checkpoint-000120\)"),
    (T + ["--resume", "--overwrite"], None, 1, "pass one of them"),
    (T[:-1] + ["{root}/a-file/out"], None, 1, r"cannot write .*a-file.*Not a directory"),
    (["train", "dora", "-m", "{model}", "--data", "{root}/latin1.jsonl", "--stop-on-bad-lines"], None, 1, r"latin1.jsonl line 1: not valid UTF-8 \(byte 0xe9"),
]


@pytest.mark.parametrize("argv, stdin, code, message", CLI_CASES, ids=[" ".join(a[:1] + a[4:] if a[2:3] == ["-m"] else a)[:60] for a, *_ in CLI_CASES])
def test_cli_bad_input_is_one_error_line(cli_files, monkeypatch, capsys, argv, stdin, code, message):
    import io
    import re

    from stratlm.cli.main import main

    argv = [a.format(model=cli_files / "model", root=cli_files) for a in argv]
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unexpected" not in err[0], err
    assert re.search(message, err[0]), err[0]


# -- the command line: version, python -m, chat, plugins that break -----------------------------------
def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    import stratlm
    from stratlm.cli.main import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"stratlm {stratlm.__version__} (mlx ")
    done = subprocess.run([sys.executable, "-m", "stratlm", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("stratlm "), done.stderr
    done = subprocess.run([sys.executable, "-m", "stratlm", "generate", "hi", "--seed", "-1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: seed must be an integer"), done.stderr


class CtrlCAtThePrompt:
    """A terminal whose user presses Ctrl-C at the prompt: input() raises KeyboardInterrupt, as it does."""

    def readline(self):
        raise KeyboardInterrupt

    def isatty(self):
        return False


def test_chat_commands_bad_lines_and_ctrl_c_at_the_prompt(cli_files, monkeypatch, capsys):
    import io

    from stratlm.cli.main import main

    lines = b"/help\n/frobnicate\ncaf\xe9\n/exit\n"  # the third line holds a byte that is not UTF-8
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    assert main(["chat", "-m", str(cli_files / "model"), "--max-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "/reset clears the history" in captured.out
    errors = captured.err.strip().splitlines()
    assert errors[0].startswith("error: unknown command /frobnicate; commands: /help")
    assert errors[1].startswith("error: message 0's content is not valid UTF-8 text (byte 0xe9")
    monkeypatch.setattr("sys.stdin", CtrlCAtThePrompt())
    assert main(["chat", "-m", str(cli_files / "model")]) == 0
    assert capsys.readouterr().err == ""


def test_chat_ctrl_c_stops_the_answer_not_the_session(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from stratlm.loaders.loading import save_model

    save_model(tiny_model("llama", seed=0, max_position_embeddings=100_000), tmp_path / "model")
    proc = subprocess.Popen([sys.executable, "-m", "stratlm", "chat", "-m", str(tmp_path / "model"), "--max-tokens", "90000", "--ignore-eos"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    proc.stdin.write(b"tell me everything\n/help\n/exit\n")
    proc.stdin.flush()
    first = proc.stdout.read(1)  # the answer has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 0, err.decode()
    assert b"(answer stopped)" in out and b"/reset clears the history" in out  # the session went on to /help and /exit
    assert b"Traceback" not in err


BROKEN_HOOK = '''
from stratlm.core.hookspecs import hookimpl


@hookimpl
def register_strategies(register):
    raise RuntimeError("boom")


@hookimpl
def register_transforms(register):
    register("never-seen", lambda loaded: loaded)
'''

DUPLICATE = '''
from stratlm.core.hookspecs import hookimpl
from stratlm.strategies.single import SingleSequence


@hookimpl
def register_strategies(register):
    register("sample", SingleSequence)  # the built-in's name
'''


def test_a_plugin_whose_hook_raises_is_named_and_skipped_and_a_duplicate_name_fails_only_that_name(cli_files, tmp_path, monkeypatch, capsys):
    import sys

    from stratlm.cli.main import main
    from stratlm.core.registry import Registry
    from stratlm.testing import write_plugin_distribution

    write_plugin_distribution(tmp_path, "stratlm-raiser", {"stratlm_raiser": BROKEN_HOOK}, {"raiser": "stratlm_raiser"})
    write_plugin_distribution(tmp_path, "stratlm-twin", {"stratlm_twin": DUPLICATE}, {"twin": "stratlm_twin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("stratlm_raiser", "stratlm_twin"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    registry = Registry()
    assert main(["plugins"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "broken plugin (skipped): stratlm-raiser:raiser: register_strategies raised RuntimeError: boom" in out
    assert "never-seen" not in out  # the broken plugin is skipped whole
    conflict = [line for line in out.splitlines() if line.startswith("conflict: strategy 'sample' is registered twice")]
    assert len(conflict) == 1 and "stratlm-twin" in conflict[0] and ("by stratlm and" in conflict[0] or "and by stratlm;" in conflict[0])
    model = str(cli_files / "model")
    assert main(["generate", "hi", "-m", model, "--max-tokens", "2", "--quiet"], registry=registry) == 0  # unrelated commands work
    assert main(["generate", "hi", "-m", model, "-s", "sample"], registry=registry) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: strategy 'sample' is registered twice")


def test_bench_without_mlx_lm_names_the_extra(cli_files, monkeypatch, capsys):
    import sys

    from stratlm.cli.main import main

    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # `import mlx_lm` now fails as it does when the extra is not installed
    code = main(["bench", "-m", str(cli_files / "model"), "--baselines", "same-process", "--reps", "1", "--warmup", "0",
                 "--prompt-tokens", "4", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == "error: `stratlm bench` needs the package 'mlx_lm', which is not installed: pip install 'stratlm[bench]'", err


class RaisingAdapterPlugin:
    """A third-party adapter reader with a bug."""

    @staticmethod
    def load_adapter(loaded, path):
        raise KeyError("lora_alpha")


def test_an_adapter_plugin_that_raises_is_named_in_the_error(base, tmp_path):
    from stratlm import Engine
    from stratlm.core.errors import ModelLoadError
    from stratlm.core.hookspecs import hookimpl
    from stratlm.core.registry import get_registry

    plugin = RaisingAdapterPlugin()
    plugin.load_adapter = hookimpl(RaisingAdapterPlugin.load_adapter)
    registry = get_registry()
    registry.pm.register(plugin, name="stratlm-buggy-adapters")
    try:
        (tmp_path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "ia3"}))
        with pytest.raises(ModelLoadError, match=r"an adapter plugin failed on .*: KeyError: 'lora_alpha' \(load_adapter plugins: .*stratlm-buggy-adapters"):
            Engine(base, adapter=tmp_path)
    finally:
        registry.pm.unregister(plugin)
