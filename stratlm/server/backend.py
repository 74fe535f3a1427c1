"""What the server runs requests on: the engine's scheduler (`engine.submit`), or, until the engine has
one, `InterimScheduler`: the same handle interface over one worker thread that owns the engine and
decodes one request at a time from a bounded queue.

The server only ever calls `submit(...)` and `metrics()` and uses the handles they return, so the
interim part goes away by deleting it once `Engine.submit` exists everywhere.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections import deque
from typing import Any, AsyncIterator, Iterator

import attrs

from stratlm.core.errors import ConfigError, StratlmError
from stratlm.core.log import get_logger
from stratlm.core.types import GenerationResult, GenerationStats

try:  # added to core with the continuous-batching scheduler
    from stratlm.core.errors import QueueFullError
except ImportError:  # pragma: no cover - until the scheduler lands

    class QueueFullError(StratlmError):
        """The scheduler's queue is full: try again later."""


log = get_logger(__name__)


def make_backend(engine_args: dict[str, Any], *, max_running: int | None = None, max_queue: int | None = None, kv_budget: int | None = None):
    """An Engine built from engine_args, with its scheduler configured; or, for an Engine without
    one, the interim scheduler around it. Either has submit(...) and metrics()."""
    from stratlm import Engine

    scheduler = {k: v for k, v in {"max_running": max_running, "max_queue": max_queue, "kv_budget": kv_budget}.items() if v is not None}
    if hasattr(Engine, "submit"):
        return Engine(**engine_args, scheduler=scheduler)
    return InterimScheduler(Engine(**engine_args), max_queue=max_queue or 256)


def supported_params() -> frozenset[str]:
    """The generation parameters this build's engine takes (penalties, logit_bias and top_logprobs
    arrive with newer engines): the server answers 400 for a field it cannot honour."""
    from stratlm.engine import make_params

    names = set(inspect.signature(make_params).parameters) - {"default_temperature"}
    return frozenset(names)


# -- the interim scheduler -------------------------------------------------------------------------
class InterimHandle:
    """One submitted request: text pieces as they come, then a GenerationResult. Thread-safe;
    async consumers are woken through their event loop."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pieces: deque[str] = deque()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # producer side (the worker)
    def _push(self, piece: str) -> None:
        with self._lock:
            self._pieces.append(piece)
            self._lock.notify_all()
        self._wake()

    def _finish(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._result is not None or self._error is not None:
                return
            self._result, self._error = result, error
            self._lock.notify_all()
        self._wake()

    def _wake(self) -> None:
        for loop, event in list(self._wakers):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its consumer is gone
                pass

    # consumer side
    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop decoding this request (idempotent); result() then has finish_reason "cancelled"."""
        self._cancelled = True

    def _take(self) -> tuple[list[str], bool]:
        with self._lock:
            pieces = list(self._pieces)
            self._pieces.clear()
            return pieces, self.done

    def __iter__(self) -> Iterator[str]:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._pieces or self.done)
            pieces, finished = self._take()
            yield from pieces
            if finished and not pieces:
                self._raise()
                return

    async def astream(self) -> AsyncIterator[str]:
        event = asyncio.Event()
        waker = (asyncio.get_running_loop(), event)
        self._wakers.append(waker)
        try:
            while True:
                event.clear()  # before looking, so a push after the look sets it again
                pieces, finished = self._take()
                for piece in pieces:
                    yield piece
                if finished and not pieces:
                    self._raise()
                    return
                if not pieces:
                    await event.wait()
        finally:
            self._wakers.remove(waker)

    def result(self, timeout: float | None = None) -> GenerationResult:
        with self._lock:
            if not self._lock.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the request has not finished yet")
        self._raise()
        return self._result

    async def aresult(self) -> GenerationResult:
        async for _ in self.astream():
            pass
        return self._result

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


@attrs.define
class _Job:
    handle: InterimHandle
    strategy: Any
    text: str
    ids: list[int]
    params: Any


class InterimScheduler:
    """engine.submit's interface over an Engine without a scheduler: one worker thread owns the
    engine (MLX work stays on one thread) and decodes one request at a time."""

    def __init__(self, engine: Any, max_queue: int = 256):
        self.engine = engine
        self.loaded = engine.loaded
        self.registry = engine.registry
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._strategies: dict[tuple, Any] = {}
        self._counts = dict.fromkeys(("requests_finished", "requests_cancelled", "prompt_tokens", "cached_prompt_tokens", "generated_tokens"), 0)
        self._running = 0
        self._supported = supported_params()
        self._worker = threading.Thread(target=self._work, name="stratlm-interim-scheduler", daemon=True)
        self._worker.start()

    # the engine's surface the server reads
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def strategy(self):
        return self.engine.strategy

    def submit(self, prompt: Any, *, strategy: str | None = None, strategy_options: dict | None = None, chat_template: bool | None = None,
               chat_template_kwargs: dict | None = None, system: str | None = None, tools: list | None = None, **params: Any) -> InterimHandle:
        unsupported = sorted(k for k in params if k not in self._supported)
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)} not supported by this engine; it takes: {', '.join(sorted(self._supported))}")
        chosen = self._strategy(strategy, strategy_options or {})
        from stratlm.engine import make_params

        generation_params = make_params(chosen.default_temperature, **params)
        kwargs = dict(chat_template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        text, ids = self.engine.render(prompt, chat_template=chat_template, chat_template_kwargs=kwargs, system=system)
        handle = InterimHandle()
        try:
            self._queue.put_nowait(_Job(handle, chosen, text, ids, generation_params))
        except queue.Full:
            raise QueueFullError(f"the request queue is full ({self._queue.maxsize} waiting); retry shortly") from None
        return handle

    def metrics(self) -> dict[str, int]:
        return {"waiting": self._queue.qsize(), "running": self._running, **self._counts}

    def close(self) -> None:
        self._queue.put(None)

    def _strategy(self, name: str | None, options: dict) -> Any:
        if name is None and not options:
            return self.engine.strategy
        name = name or self.engine.strategy.name
        key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._strategies:  # strategies hold no per-request state; a draft model loads once
            self._strategies[key] = self.registry.get("strategy", name)(self.loaded, registry=self.registry, **options)
        return self._strategies[key]

    def _work(self) -> None:
        for job in iter(self._queue.get, None):
            handle = job.handle
            if handle.cancelled:
                self._counts["requests_cancelled"] += 1
                handle._finish(cancelled_result(job.text, ""))
                continue
            self._running = 1
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - a failed request must not stop the worker
                log.debug("request failed", error=repr(exc))
                handle._finish(error=exc)
            finally:
                self._running = 0

    def _run(self, job: _Job) -> None:
        handle, pieces = job.handle, []
        stream = job.strategy.stream(job.ids, job.params)
        try:
            for item in stream:
                if handle.cancelled:
                    break
                if isinstance(item, GenerationResult):
                    result = item if item.prompt else attrs.evolve(item, prompt=job.text)
                    self._counts["requests_finished"] += 1
                    self._counts["prompt_tokens"] += result.stats.prompt_tokens
                    self._counts["generated_tokens"] += result.stats.generation_tokens
                    handle._finish(result)
                    return
                pieces.append(item)
                handle._push(item)
        finally:
            stream.close()  # frees the request's cache now
        self._counts["requests_cancelled"] += 1
        handle._finish(cancelled_result(job.text, "".join(pieces), len(job.ids)))



def cancelled_result(prompt: str, text: str, prompt_tokens: int = 0) -> GenerationResult:
    return GenerationResult(text=text, token_ids=(), finish_reason="cancelled", prompt=prompt, stats=GenerationStats(prompt_tokens=prompt_tokens))
