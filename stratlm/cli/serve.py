"""stratlm serve: an OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time

from stratlm.core.errors import ConfigError

from .common import add_model_options, add_parallel_option, parse_transforms

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve a model over OpenAI's HTTP API (chat/completions, completions, models), with every strategy per request.")
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="alias, hub repo id, folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    add_model_options(p)
    add_parallel_option(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("STRATLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $STRATLM_API_KEY, else none)")
    g.add_argument("--max-running", type=int, default=None, help="most requests decoded together (the scheduler's batch)")
    g.add_argument("--max-queue", type=int, default=None, help="most requests waiting; beyond it requests get 429 with Retry-After")
    g.add_argument("--kv-budget", default=None, metavar="SIZE", help="KV cache memory for the running requests, e.g. 2GB or 512MiB")
    g.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none (default 512)")
    g.add_argument("--max-body", default="4MiB", metavar="SIZE", help="largest request body accepted (default 4MiB)")
    g.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="origins browsers may call from (CORS), e.g. http://localhost:3000 or '*'")
    g.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn's log level")
    p.set_defaults(run=run)


def parse_size(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"{what} must be a size such as 2GB, 512MiB or 1048576, got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def check_args(args: argparse.Namespace) -> None:
    if args.model_arg and args.model and args.model_arg != args.model:
        raise ConfigError(f"two models given ({args.model_arg!r} and -m {args.model!r}); give one")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_running", "max_queue", "default_max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    kv_budget = parse_size(args.kv_budget, "--kv-budget")
    max_body = parse_size(args.max_body, "--max-body")
    import uvicorn

    from stratlm.server.app import create_app, model_names
    from stratlm.server.backend import make_backend

    source = args.model_arg or args.model
    engine_args = dict(model=source, transforms=parse_transforms(args.transform), adapter=args.adapter, fuse_adapter=not args.no_fuse_adapter,
                       dtype=args.dtype, quantized=args.quantized, registry=getattr(args, "registry", None), parallel=args.parallel)
    # split over processes (--parallel): on ranks > 0 this follows rank 0's forwards and ends the process; only rank 0 serves HTTP
    backend = make_backend(engine_args, max_running=args.max_running, max_queue=args.max_queue, kv_budget=kv_budget)
    names = model_names(source, backend.loaded, backend.registry)
    app = create_app(backend, model_names=names, api_key=args.api_key, default_max_tokens=args.default_max_tokens, max_body_bytes=max_body,
                     allowed_origins=args.allowed_origins)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    split = getattr(backend, "split", None)
    where = f", split over {backend.model.plan.size} processes ({split})" if split else ""
    print(f"stratlm serve: {names[0]} on http://{args.host}:{args.port}/v1 (OpenAI API; /health, /metrics){where}", flush=True)
    if split:
        threading.Thread(target=stop_when_group_lost, args=(server,), daemon=True, name="stratlm-serve-group").start()
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: with the default handler that would end the
    # process before the finally below (a split model's other processes would never hear the stop message)
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        close = getattr(backend, "close", None)
        if close is not None:  # stops the scheduler's thread (and a split model's other processes)
            close()
    if split:
        from stratlm.distributed.group import lost_error

        lost = lost_error()
        if lost is not None:  # one line, exit status 1; at once: a thread MLX left blocked on the lost process could hold up the exit
            sys.stderr.write(f"error: {lost}\n")
            sys.stderr.flush()
            os._exit(1)
    return 0


def exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signal.SIGTERM)


def stop_when_group_lost(server) -> None:
    """A process of the split model is gone: the request that found it was answered 503 with the
    reason; stop serving (in-flight answers still go out) rather than fail every later request."""
    from stratlm.distributed.group import group_lost

    while not server.should_exit:
        if group_lost():
            server.should_exit = True
            return
        time.sleep(0.2)
