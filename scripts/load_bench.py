"""Load generator for OpenAI-compatible servers: N concurrent streaming chat clients, each sending
requests back to back; reports requests/s, output tokens/s and time to first token p50/p99.

    # start each server itself, on the same model folder, one after the other:
    PYTHONPATH=. python3 scripts/load_bench.py --model /tmp/smol --servers stratlm mlx-lm --clients 1 8 64
    # or drive a server that is already running:
    python3 scripts/load_bench.py --url http://127.0.0.1:8000/v1 --clients 8

The model must be a folder both engines read (config.json + safetensors + tokenizer; e.g.
`stratlm transform smollm2-135m --out /tmp/smol` writes the embedded SmolLM2 as one).
Output tokens are counted from each response's `usage` (stream_options.include_usage), or from
the streamed chunks when a server sends none. Prompts differ per request (no prefix cache effect
beyond the shared chat template).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOPICS = ["the sea", "a lighthouse", "winter", "a train journey", "the moon", "a library", "mountains", "a city at night", "rain", "a garden"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, model: str, port: int, extra: list[str]) -> subprocess.Popen:
    if kind == "stratlm":
        cmd = [sys.executable, "-m", "stratlm.cli.main", "serve", model, "--port", str(port), *extra]
    elif kind == "mlx-lm":
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", str(port), "--log-level", "WARNING", *extra]
    else:
        raise SystemExit(f"unknown server {kind!r}: stratlm or mlx-lm")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not come up")


async def one_request(client: httpx.AsyncClient, base: str, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (story {i})."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    retries = 0
    while True:  # a server that refuses or drops connections under load: retried, the wait counts in TTFT
        try:
            return await read_stream(client, base, body, start, retries)
        except httpx.TransportError as exc:
            retries += 1
            if retries > 20:
                return {"error": type(exc).__name__, "retries": retries}
            await asyncio.sleep(0.05 * retries)


async def read_stream(client: httpx.AsyncClient, base: str, body: dict, start: float, retries: int) -> dict:
    first, chunks, usage = None, 0, None
    async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code, "retries": retries}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": tokens, "latency": time.perf_counter() - start,
            "retries": retries}


async def run_level(base: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    counter = iter(range(requests))
    results: list[dict] = []

    async def client_loop(client):
        for i in counter:  # shared: each client takes the next request until none is left
            results.append(await one_request(client, base, model, i, max_tokens))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)

    def pct(p):
        return ttfts[min(len(ttfts) - 1, int(p / 100 * len(ttfts)))] if ttfts else float("nan")

    return {"clients": clients, "requests": len(ok), "errors": len(results) - len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
            "output_tok_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50_s": pct(50), "ttft_p99_s": pct(99),
            "mean_tokens": sum(r["tokens"] for r in ok) / max(1, len(ok)), "retries": sum(r.get("retries", 0) for r in results)}


def make_random_model(out: str, config_json: str, tokenizer_dir: str, dtype: str) -> None:
    """A model folder with random weights of the given config's shape and a real tokenizer (for a
    GPU machine that cannot download checkpoints): both servers load it like any checkpoint."""
    import shutil

    import mlx.core as mx
    import mlx.nn as nn

    from stratlm.core.model import LoadedModel
    from stratlm.core.registry import get_registry
    from stratlm.core.tokenizer import Tokenizer
    from stratlm.loaders.loading import DTYPES, build_model, family_for, save_model

    config = json.loads(Path(config_json).read_text())
    registry = get_registry()
    mx.random.seed(0)
    model = build_model(config, registry)
    model.set_dtype(DTYPES[dtype])
    # init scale ~ 1/sqrt(fan_in) keeps activations finite through many layers
    model.update(nn.utils.tree_map(lambda a: (mx.random.normal(a.shape) * (a.shape[-1] ** -0.5)).astype(a.dtype) if a.ndim == 2 else a, model.parameters()))
    tokenizer = Tokenizer.from_folder(tokenizer_dir, eos_token_ids=[config.get("eos_token_id", 2)])
    save_model(LoadedModel(model=model, tokenizer=tokenizer, family=family_for(config, registry), source="random"), out)
    for name in ("chat_template.jinja",):
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, Path(out) / name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder both servers load (with --servers)")
    ap.add_argument("--servers", nargs="+", default=["stratlm", "mlx-lm"], help="servers to start, one after the other")
    ap.add_argument("--url", help="an already running server's base URL (…/v1) instead of --servers")
    ap.add_argument("--served-name", default=None, help="the `model` field to send (default: --model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x clients))")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--stratlm-args", default="", help="extra arguments for stratlm serve, e.g. '--max-running 64'")
    ap.add_argument("--mlx-args", default="", help="extra arguments for mlx_lm server, e.g. '--decode-concurrency 64'")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--random-config", default=None, help="first write --model with random weights of this config.json's shape")
    ap.add_argument("--tokenizer", default=None, help="with --random-config: the tokenizer folder to save with it")
    ap.add_argument("--dtype", default="bfloat16", help="with --random-config: the weights' dtype")
    args = ap.parse_args()
    if args.random_config:
        make_random_model(args.model, args.random_config, args.tokenizer, args.dtype)

    targets = [("url", args.url)] if args.url else [(kind, None) for kind in args.servers]
    rows = []
    for kind, url in targets:
        proc = None
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1"
            extra = (args.stratlm_args if kind == "stratlm" else args.mlx_args).split()
            proc = launch(kind, args.model, port, extra)
        try:
            wait_ready(proc, url) if proc else None
            name = args.served_name or args.model or "default"
            asyncio.run(run_level(url, name, 1, 2, 8))  # warm-up: first-use compilation, caches
            for clients in args.clients:
                requests = args.requests or max(8, 2 * clients)
                row = {"server": kind, **asyncio.run(run_level(url, name, clients, requests, args.max_tokens))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, max_tokens {args.max_tokens}, greedy, streaming")
    print("| server | clients | requests | req/s | output tok/s | TTFT p50 (s) | TTFT p99 (s) | errors | retried connections |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['output_tok_per_s']:.1f} "
              f"| {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['errors']} | {r['retries']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
