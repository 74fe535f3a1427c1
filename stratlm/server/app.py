"""The OpenAI-compatible HTTP API (FastAPI) over an Engine's scheduler (engine.submit / engine.metrics).
See docs/server.md for every field."""

from __future__ import annotations

import asyncio
import difflib
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ValidationError

from stratlm.core.errors import ConfigError, DistributedError, QueueFullError, RequestFailedError, StratlmError, UnknownNameError
from stratlm.core.log import get_logger
from stratlm.core.types import GenerationResult

from .backend import supported_params
from .schemas import IGNORED_FIELDS, ChatCompletionRequest, CommonRequest, CompletionRequest

log = get_logger(__name__)

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- the app ---------------------------------------------------------------------------------------
def create_app(backend: Any, *, model_names: Sequence[str], api_key: str | None = None, default_max_tokens: int = 512,
               max_body_bytes: int = DEFAULT_MAX_BODY, allowed_origins: Sequence[str] = ()) -> FastAPI:
    """backend: an Engine with a scheduler (or the interim one); model_names: the served model's id
    first, then the aliases a request's `model` may also use."""
    app = FastAPI(title="stratlm", docs_url=None, redoc_url=None, openapi_url=None)
    names = list(dict.fromkeys(model_names))
    server = Server(backend, names, default_max_tokens, max_body_bytes)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        server.http_requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still OpenAI's error JSON, the server keeps serving
        log.error("unexpected error", path=request.url.path, error=repr(exc))
        server.http_requests.labels(request.url.path, "500").inc()
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                server.http_requests.labels(request.url.path, "401").inc()
                return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key").response()
        return await call_next(request)

    if allowed_origins:  # browser clients on other origins; added last, so preflights are answered before the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": names[0]}

    @app.get("/v1/models")
    async def models():
        created = server.started
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "stratlm", "root": names[0]} for name in names]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.handle(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, CompletionRequest, chat=False)

    return app


class Server:
    """Request handling: parse and check the body, submit to the backend, answer or stream."""

    def __init__(self, backend: Any, names: list[str], default_max_tokens: int, max_body_bytes: int):
        self.backend, self.names = backend, names
        self.default_max_tokens, self.max_body_bytes = default_max_tokens, max_body_bytes
        self.tokenizer = backend.tokenizer
        self.registry_of_names = backend.registry
        self.default_strategy = backend.strategy.name
        self.started = int(time.time())
        self.supported = supported_params()
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(backend))
        self.http_requests = Counter("stratlm_http_requests", "HTTP requests answered, by path and status", ["path", "status"], registry=self.registry)
        self.ttft = Histogram("stratlm_time_to_first_token_seconds", "From the request's arrival to its first text piece", registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("stratlm_request_duration_seconds", "From the request's arrival to its last byte", registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    # -- parsing -----------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"the request body is {length} bytes; this server takes at most {self.max_body_bytes}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"the request body is over {self.max_body_bytes} bytes, this server's limit", code="body_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8", code="invalid_encoding") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="invalid_json") from None

    def parse(self, body: Any, schema: type[BaseModel]) -> Any:
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        try:
            return schema.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"]
            if first["type"] == "missing":
                message = "this field is required"
            got = f" (got {first['input']!r})" if first["type"] != "missing" and not isinstance(first.get("input"), (dict, list)) else ""
            raise APIError(400, f"{param}: {message}{got}", param=param) from None

    def check_model(self, req: CommonRequest) -> str:
        if req.model is None or req.model in self.names:
            return self.names[0]
        raise APIError(404, f"the model {req.model!r} is not served here; this server serves {', '.join(repr(n) for n in self.names)}",
                       param="model", code="model_not_found")

    def strategy_of(self, req: CommonRequest) -> tuple[str | None, dict[str, Any], int]:
        """(strategy name or None for the server's default, its options, choices per prompt)."""
        name = req.strategy
        options = dict(req.strategy_options or {})
        try:
            cls = self.registry_of_names.get("strategy", name or self.default_strategy)
        except UnknownNameError as exc:
            raise APIError(400, str(exc), param="strategy", code="unknown_strategy") from None
        declared = tuple(getattr(cls, "options", ()))
        for key, value in (req.model_extra or {}).items():
            if key in declared:
                options.setdefault(key, value)
            elif key not in IGNORED_FIELDS:
                known = sorted(set(type(req).model_fields) | set(declared))
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                what = f"strategy {cls.name!r} takes options: {', '.join(declared) or 'none'}"
                raise APIError(400, f"unknown field {key!r}.{hint} ({what}; strategy options may also go in 'strategy_options')", param=key)
        choices = req.n
        if "n" in declared and "n" in req.model_fields_set and "n" not in options:
            options["n"], choices = req.n, 1  # `"strategy": "vote", "n": 8` means eight votes, one answer
        if name is None and options:
            name = self.default_strategy
        return name, options, choices

    def params_of(self, req: CommonRequest, chat: bool) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": self.default_max_tokens}
        limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if limit is not None:
            params["max_tokens"] = limit
        for field in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
            value = getattr(req, field)
            if value is not None:
                params[field] = value
        if req.stop:
            params["stop"] = list(req.stop)
        if req.ignore_eos:
            params["ignore_eos"] = True
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(req, field):  # 0 (the default) asks for nothing
                params[field] = getattr(req, field)
        if req.logit_bias:
            params["logit_bias"] = dict(req.logit_bias)
        if chat:
            if req.top_logprobs and not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if req.logprobs:
                params["logprobs"] = True
            if req.top_logprobs:
                params["top_logprobs"] = req.top_logprobs
        elif req.logprobs is not None:
            params["logprobs"] = True
            if req.logprobs > 0:
                params["top_logprobs"] = req.logprobs
        for field in params:
            if field not in self.supported:
                raise APIError(400, f"{field} is not supported by this server's engine yet; leave it out (supported: {', '.join(sorted(self.supported))})",
                               param=field, code="unsupported_parameter")
        return params

    # -- one request -------------------------------------------------------------------------------
    async def handle(self, request: Request, schema: type[CommonRequest], chat: bool) -> Response:
        arrived = time.perf_counter()
        req = self.parse(await self.read_json(request), schema)
        model = self.check_model(req)
        strategy, options, choices = self.strategy_of(req)
        params = self.params_of(req, chat)
        if chat:
            try:
                prompts: list[Any] = [[m.for_template() for m in req.messages]]
            except ValueError as exc:
                raise APIError(400, f"messages: {exc}", param="messages") from None
            extra = {"chat_template_kwargs": req.chat_template_kwargs, "tools": req.tools}
        else:
            prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            extra = {"chat_template": False}
        handles = self.submit(prompts, choices, strategy, options, params, extra, chat)
        meta = Meta(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], model=model, created=int(time.time()), chat=chat,
                    strategy=strategy or self.default_strategy, arrived=arrived, prompts=prompts if not chat else [],
                    echo=getattr(req, "echo", False), logprobs=params.get("logprobs", False), per_prompt=choices)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.stream(request, handles, meta, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await self.collect(request, handles, meta)
        except StratlmError as exc:  # the engine failed the request after accepting it
            raise submit_error(exc, "messages" if chat else "prompt") from None
        if results is None:  # the client left; nobody reads this
            return Response(status_code=499)
        self.http_requests.labels(request.url.path, "200").inc()
        self.latency.observe(time.perf_counter() - arrived)
        return JSONResponse(self.response(results, meta))

    def submit(self, prompts: list[Any], choices: int, strategy, options, params, extra, chat: bool) -> list[Any]:
        handles = []
        try:
            for prompt in prompts:
                for i in range(choices):
                    p = dict(params)
                    if choices > 1 and "seed" in p:
                        p["seed"] = p["seed"] + i  # n choices from one seed: each its own, all reproducible
                    handles.append(self.backend.submit(prompt, strategy=strategy, strategy_options=options, **extra, **p))
        except BaseException as exc:
            for h in handles:
                h.cancel()
            raise submit_error(exc, "messages" if chat else "prompt") from None
        return handles

    async def first_piece_watch(self, handle, meta: "Meta") -> AsyncIterator[str]:
        async for piece in handle.astream():
            if not meta.first_seen:
                meta.first_seen = True
                self.ttft.observe(time.perf_counter() - meta.arrived)
            yield piece

    async def collect(self, request: Request, handles: list[Any], meta: "Meta") -> list[GenerationResult] | None:
        async def one(h):
            async for _ in self.first_piece_watch(h, meta):
                pass
            return await h.aresult()

        task = asyncio.ensure_future(asyncio.gather(*(one(h) for h in handles)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        finally:
            if not task.done():
                task.cancel()
            for h in handles:
                if not h.done:
                    h.cancel()

    async def stream(self, request: Request, handles: list[Any], meta: "Meta", include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks in OpenAI's format; a client that goes away cancels every one of its requests
        (Starlette cancels this generator when the connection closes; `finally` frees the rows)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, h) -> None:
            try:
                async for piece in self.first_piece_watch(h, meta):
                    await queue.put((index, piece, None))
                await queue.put((index, None, await h.aresult()))
            except BaseException as exc:  # noqa: BLE001 - reported in the stream
                await queue.put((index, None, exc))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        results: list[GenerationResult | None] = [None] * len(handles)
        try:
            if meta.chat:
                for i in range(len(handles)):
                    yield sse(chunk(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
            elif meta.echo:
                for i in range(len(handles)):
                    yield sse(chunk(meta, [{"index": i, "text": meta.prompt_of(i, len(handles)), "logprobs": None, "finish_reason": None}]))
            remaining = len(handles)
            while remaining:
                index, piece, end = await queue.get()
                if piece is not None:
                    if meta.chat:
                        yield sse(chunk(meta, [{"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]))
                    else:
                        yield sse(chunk(meta, [{"index": index, "text": piece, "logprobs": None, "finish_reason": None}]))
                    continue
                remaining -= 1
                if isinstance(end, BaseException):
                    error = submit_error(end) if not isinstance(end, APIError) else end
                    yield sse({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}})
                    return
                results[index] = end
                yield sse(chunk(meta, [self.final_choice(index, end, meta)], stratlm=self.extension([end], meta, index)))
            if include_usage:
                yield sse(chunk(meta, [], usage=usage(results, meta.per_prompt)))
            yield "data: [DONE]\n\n"
            self.http_requests.labels(request.url.path, "200").inc()
            self.latency.observe(time.perf_counter() - meta.arrived)
        finally:
            for t in tasks:
                t.cancel()
            for h in handles:
                if not h.done:
                    h.cancel()

    # -- answers -----------------------------------------------------------------------------------
    def final_choice(self, index: int, result: GenerationResult, meta: "Meta") -> dict[str, Any]:
        """The last streamed chunk of a choice: no text, its finish reason and logprobs."""
        lp = self.logprobs(result, meta) if meta.logprobs else None
        if meta.chat:
            return {"index": index, "delta": {}, "logprobs": lp, "finish_reason": result.finish_reason}
        return {"index": index, "text": "", "logprobs": lp, "finish_reason": result.finish_reason}

    def response(self, results: list[GenerationResult], meta: "Meta") -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            lp = self.logprobs(r, meta) if meta.logprobs else None
            if meta.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": lp, "finish_reason": r.finish_reason})
            else:
                text = meta.prompt_of(i, len(results)) + r.text if meta.echo else r.text
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
        return {"id": meta.id, "object": "chat.completion" if meta.chat else "text_completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": usage(results, meta.per_prompt), "system_fingerprint": None, "stratlm": self.extension(results, meta)}

    def extension(self, results: list[GenerationResult | None], meta: "Meta", index: int | None = None) -> dict[str, Any]:
        """stratlm's own results: the strategy and what it reports (votes, scores, acceptance) per choice."""
        from stratlm.cli.common import jsonable

        out: dict[str, Any] = {"strategy": meta.strategy, "choices": [jsonable(r.extra) if r is not None else None for r in results]}
        if index is not None:
            out["index"] = index
        return out

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, result: GenerationResult, meta: "Meta") -> dict[str, Any] | None:
        if result.logprobs is None:
            return None
        tops = getattr(result, "top_logprobs", None) or [None] * len(result.logprobs)
        tokens = list(result.token_ids)[: len(result.logprobs)]
        if meta.chat:
            content = []
            for token, lp, top in zip(tokens, result.logprobs, tops):
                text = self.token_text(token)
                alts = [{"token": self.token_text(t), "logprob": float(v), "bytes": list(self.token_text(t).encode())} for t, v in (top or {}).items()]
                content.append({"token": text, "logprob": float(lp), "bytes": list(text.encode()), "top_logprobs": alts})
            return {"content": content}
        texts = [self.token_text(t) for t in tokens]
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        top_lists = [{self.token_text(t): float(v) for t, v in top.items()} if top is not None else None for top in tops]
        return {"tokens": texts, "token_logprobs": [float(v) for v in result.logprobs],
                "top_logprobs": top_lists if any(t is not None for t in top_lists) else None,
                "text_offset": offsets}


class Meta:
    """What the answer to one request carries besides the results."""

    def __init__(self, *, id: str, model: str, created: int, chat: bool, strategy: str, arrived: float, prompts: list, echo: bool, logprobs: bool,
                 per_prompt: int = 1):
        self.id, self.model, self.created, self.chat, self.strategy, self.per_prompt = id, model, created, chat, strategy, per_prompt
        self.arrived, self.prompts, self.echo, self.logprobs = arrived, prompts, echo, logprobs
        self.first_seen = False

    def prompt_of(self, choice: int, total: int) -> str:
        return self.prompts[choice // self.per_prompt] if self.prompts else ""


def chunk(meta: Meta, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    obj = "chat.completion.chunk" if meta.chat else "text_completion"
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": choices, **extra}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(results: Sequence[GenerationResult | None], per_prompt: int = 1) -> dict[str, Any]:
    """OpenAI's counting: n choices of one prompt read it once; completions add up."""
    firsts = [r for r in results[::per_prompt] if r is not None]
    done = [r for r in results if r is not None]
    prompt = sum(r.stats.prompt_tokens for r in firsts)
    completion = sum(len(r.token_ids) for r in done)
    cached = sum(getattr(r.stats, "cached_prompt_tokens", 0) or 0 for r in firsts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def submit_error(exc: BaseException, prompt_param: str = "prompt") -> APIError:
    """The engine's errors as HTTP answers: bad input 400, a full queue 429 with Retry-After."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailedError):  # the engine failed the request: our fault, not the client's
        return APIError(500, str(exc), type="server_error", code="request_failed")
    if isinstance(exc, DistributedError):  # a process of a split model is gone: this server cannot answer (and stops)
        return APIError(503, str(exc), type="server_error", code="process_group_lost")
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(exc, UnknownNameError):
        param = "strategy" if exc.kind == "strategy" else None
        return APIError(400, str(exc), param=param, code=f"unknown_{exc.kind.replace(' ', '_')}")
    if isinstance(exc, ConfigError):
        first = str(exc).split(" ", 1)[0]
        param = first if first.isidentifier() and first in PARAM_NAMES else None
        if "context" in str(exc) and "prompt" in str(exc):
            return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
        return APIError(400, str(exc), param=param)
    if isinstance(exc, StratlmError):
        return APIError(400, str(exc))
    raise exc


PARAM_NAMES = frozenset(ChatCompletionRequest.model_fields) | frozenset(CompletionRequest.model_fields) | {"top_k", "min_p"}


class EngineCollector:
    """Prometheus metrics read from backend.metrics() at each scrape, plus a recent tokens/s."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.samples: list[tuple[float, int]] = []

    def collect(self):
        m = self.backend.metrics()
        now = time.monotonic()
        self.samples = [(t, c) for t, c in self.samples if now - t <= 60] + [(now, m.get("generated_tokens", 0))]
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        yield GaugeMetricFamily("stratlm_requests_waiting", "Requests queued, not yet decoding (queue depth)", value=m.get("waiting", 0))
        yield GaugeMetricFamily("stratlm_requests_running", "Requests decoding now (rows in the batch)", value=m.get("running", 0))
        for key, doc in (("requests_finished", "Requests finished"), ("requests_cancelled", "Requests cancelled (client gone)"),
                         ("prompt_tokens", "Prompt tokens read"), ("cached_prompt_tokens", "Prompt tokens found in the prefix cache"),
                         ("generated_tokens", "Tokens generated")):
            yield CounterMetricFamily(f"stratlm_{key}", doc, value=m.get(key, 0))
        prompt = m.get("prompt_tokens", 0)
        hit_rate = m["prefix_cache_hit_rate"] if "prefix_cache_hit_rate" in m else (m.get("cached_prompt_tokens", 0) / prompt if prompt else 0.0)
        yield GaugeMetricFamily("stratlm_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache", value=hit_rate)
        yield GaugeMetricFamily("stratlm_generation_tokens_per_second", "Tokens generated per second since the scrape up to a minute ago",
                                value=(c1 - c0) / (t1 - t0) if t1 > t0 else 0.0)
        for key, value in m.items():  # whatever else the scheduler reports (KV bytes reserved, prefilling, ...)
            if key not in self.SHOWN and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"stratlm_{key}", f"the scheduler's {key.replace('_', ' ')}", value=value)

    SHOWN = frozenset({"waiting", "running", "requests_finished", "requests_cancelled", "prompt_tokens", "cached_prompt_tokens", "generated_tokens",
                       "prefix_cache_hit_rate"})


def model_names(source: str | None, loaded: Any, registry: Any) -> list[str]:
    """The served model's id (the name it was started with) and the other names that reach it:
    its alias or hub id, and loaded.source."""
    from stratlm.loaders.loading import DEFAULT_ALIAS

    first = source or DEFAULT_ALIAS
    aliases = {name: entry.obj for name, entry in registry.table("model alias").items()}
    names = [first]
    if first in aliases:
        names.append(aliases[first])
    names += [a for a, hub in aliases.items() if hub == first]
    if loaded.source:
        names.append(str(loaded.source))
    return list(dict.fromkeys(names))
