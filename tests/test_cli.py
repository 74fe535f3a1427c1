"""The command line: output, JSON, and one-line errors with a non-zero exit for bad input."""

import json
import os
import subprocess
import sys

import pytest

from stratlm import save_model
from stratlm.cli.main import main
from stratlm.core.registry import Registry
from stratlm.testing import tiny_model, write_plugin_distribution


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model(tiny_model("qwen3", seed=2), tmp_path_factory.mktemp("tiny-qwen3")))


def test_generate_prints_input_output_and_benchmark_boxes(model_dir, capsys):
    assert main(["generate", "hello", "-m", model_dir, "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    for title in ("Inp 00000", "Out 00000", "Benchmark"):
        assert title in out
    assert "tokens/sec" in out and "Peak memory" in out


def test_generate_json_reports_tokens_logprobs_and_stats(model_dir, capsys):
    assert main(["generate", "hello", "-m", model_dir, "--max-tokens", "4", "--ignore-eos", "--json", "--logprobs"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["token_ids"]) == 4 and len(payload["logprobs"]) == 4
    assert all(lp <= 0 for lp in payload["logprobs"])
    assert payload["finish_reason"] == "length"
    assert payload["stats"]["prompt_tokens"] > 0


def test_logit_bias_and_penalties_from_the_command_line(model_dir, capsys):
    argv = ["generate", "hello", "-m", model_dir, "--max-tokens", "4", "--ignore-eos", "--json", "--presence-penalty", "0.5"]
    assert main(argv + ["--frequency-penalty", "0.2", "--logit-bias", "100=100"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [100] * 4


def test_several_prompts_decode_together(model_dir, capsys):
    assert main(["generate", "a", "bb", "-m", model_dir, "--max-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "-m", "smollm2-135"], "Did you mean 'smollm2-135m'"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "hi", "-s", "gredy"], "Did you mean 'greedy'"),
        (["generate", "hi", "-m", "/nonexistent/model.gguf"], "GGUF file not found"),
        (["generate"], "no prompt given"),
        (["generate", "hi", "-o", "n"], "is not KEY=VALUE"),
        (["generate", "hi", "--logit-bias", "5"], "--logit-bias takes TOKEN_ID=BIAS"),
        (["generate", "hi", "--logit-bias", "5=200"], "logit_bias values must be numbers in [-100, 100]"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unsupported_architecture_and_corrupt_files(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt-neo"}))
    assert main(["generate", "hi", "-m", str(tmp_path)]) == 1
    assert "unsupported architecture model_type='gpt-neo'" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert main(["generate", "hi", "-m", str(bad)]) == 1
    assert "bad.gguf is not a GGUF file" in capsys.readouterr().err


def test_plugins_and_info(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "[stratlm]" in out and "qwen3-0.6b" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"mlx", "device", "blas", "cpu kernels", "memory (GB)"} <= set(info)


def test_chat_keeps_the_history_across_turns(model_dir, monkeypatch, capsys):
    import io

    from stratlm import Engine

    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n/system be terse\nsecond question\n/exit\n"))
    assert main(["chat", "-m", model_dir, "--max-tokens", "4", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    # the second turn's prompt holds the first exchange and the system message
    engine = Engine(model_dir)
    first = engine.generate("first question", max_tokens=4, ignore_eos=True).text
    history = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": first}, {"role": "user", "content": "second question"}]
    second = engine.generate(history, system="be terse", max_tokens=4, ignore_eos=True).text
    assert out == f"{first}\n(system message set)\n{second}\n"


HELLO_PLUGIN = '''
"""A third-party plugin adding a `stratlm hello` subcommand."""
from stratlm.core.hookspecs import hookimpl


class Hello:
    def add_parser(self, sub):
        p = sub.add_parser("hello", help="greet from a plugin")
        p.add_argument("--name", default="world")
        p.set_defaults(run=lambda args: print(f"hello, {args.name}") or 0)


@hookimpl
def register_commands(register):
    register("hello", Hello())
'''

BROKEN_PLUGIN = '''
from stratlm.core.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    raise RuntimeError("the command plugin is broken")
'''


@pytest.fixture
def command_plugins(tmp_path, monkeypatch):
    write_plugin_distribution(tmp_path, "stratlm-hello", {"stratlm_hello": HELLO_PLUGIN}, {"hello": "stratlm_hello"})
    write_plugin_distribution(tmp_path, "stratlm-brokencmd", {"stratlm_brokencmd": BROKEN_PLUGIN}, {"brokencmd": "stratlm_brokencmd"})
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("stratlm_hello", "stratlm_brokencmd"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return tmp_path


def test_a_plugins_command_shows_in_help_and_runs_beside_a_broken_one(command_plugins, capsys):
    registry = Registry()
    assert "hello" in registry.names("command") and "generate" in registry.names("command")
    assert "register_commands raised RuntimeError" in registry.failed["stratlm-brokencmd:brokencmd"]
    warning = [line for line in capsys.readouterr().err.splitlines() if "stratlm-brokencmd" in line]
    assert len(warning) == 1 and "plugin hook failed; skipped" in warning[0]
    assert main(["hello", "--name", "stratlm"], registry=registry) == 0
    assert capsys.readouterr().out == "hello, stratlm\n"
    assert main(["plugins", "--json"], registry=registry) == 0  # the built-in commands keep working
    listing = json.loads(capsys.readouterr().out)
    assert "hello" in [c["name"] for c in listing["plugins"]["command"]] and "stratlm-brokencmd:brokencmd" in listing["failed"]


def test_stratlm_help_lists_a_plugins_command_and_warns_once_about_a_broken_one(command_plugins):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(command_plugins)] + sys.path))
    done = subprocess.run([sys.executable, "-m", "stratlm.cli.main", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    commands = done.stdout.split("positional arguments:")[1]
    assert "greet from a plugin" in commands and "generate" in commands and "bench" in commands
    assert [line for line in done.stderr.splitlines() if "stratlm-brokencmd" in line] != [] and done.stderr.count("\n") == 1
