"""Continuous batching: one loop owns the model and runs every request in a shared decode batch.

Requests are submitted from any thread (or asyncio task) and get a `RequestHandle` that streams
text pieces and ends with a GenerationResult. The loop, on its own thread, repeats:
  1. retire cancelled requests, admit waiting ones while rows and the KV budget allow;
  2. prefill one chunk of the oldest admitted prompt (chunked prefill: running rows keep
     flowing while a long prompt enters), starting from the longest cached prefix;
  3. one decode step for every running row (rows with draft tokens verify them in the same
     forward; the rest take one token);
  4. retire finished rows, keeping their keys and values in the prefix cache.
A strategy is a per-request policy (core.strategy.RequestPolicy): how many rows, what to
propose, how to combine the rows' results. A strategy without one runs its own `stream`
between batch steps, one request at a time.

Only this loop's thread touches the model while the scheduler runs: MLX arrays are bound to the
stream of the thread that builds them, and the model caches state lazily (RoPE tables).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import threading
import time
import weakref
from collections import deque
from typing import AsyncIterator, Iterable, Iterator, Sequence

import attrs
import mlx.core as mx

from stratlm.core.cache import KVCache
from stratlm.core.errors import ConfigError, QueueFullError, RequestFailedError, StratlmError
from stratlm.core.log import get_logger
from stratlm.core.model import LoadedModel
from stratlm.core.strategy import RequestPolicy, Strategy
from stratlm.core.types import GenerationParams, GenerationResult, GenerationStats

from . import batch_cache
from .completion import Completion
from .loop import prefill, token_logprobs
from .prefix_cache import PrefixCache
from .processors import History
from .sampler import Sampler, log_softmax
from .speculation import process_positions, verify

log = get_logger(__name__)

GB = 1 << 30
PREFILL_ROWS = 32  # the most new rows a running batch waits for before a prefill (see PREFILL_SHARE)
MIN_REUSED_PREFIX = 64  # shorter cached prefixes are recomputed in a batched prefill (see _fresh_group)
MAX_ROOM = 512  # most free positions a joined batch keeps (a longer generation grows the storage)
BUCKET = 16  # a batched prefill's width is a multiple of this: fewer distinct shapes to compile
# With batch_prefills (the default on a GPU), new prompts wait while rows decode until there are
# PREFILL_MIN_ROWS of them and a PREFILL_SHARE-th as many as running rows, or until the oldest has
# waited PREFILL_WAIT decode steps: on a GPU a prefill's forward costs about as much for one short
# prompt as for several, and every running row waits for it. On the CPU it costs per token, and a
# prompt is prefilled at once.
PREFILL_SHARE = 8
PREFILL_WAIT = 8
PREFILL_MIN_ROWS = 8


def bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def default_kv_budget() -> int:
    """A quarter of the machine's memory, at most 16 GiB."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * GB
    return int(min(memory // 4, 16 * GB))


def _positive(name: str):
    def check(instance, attribute, value):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"scheduler option {name} must be a positive integer, got {value!r}")

    return check


@attrs.frozen
class SchedulerConfig:
    """max_running: rows decoding at once. max_queue: requests waiting beyond them (more is
    QueueFullError). kv_budget: bytes of keys and values for running rows (None: a quarter of
    memory, at most 16 GiB); a request reserves its prompt plus max_tokens positions per row.
    prefix_cache_bytes: kept prompt prefixes (None: a quarter of kv_budget; 0: off).
    prefill_chunk: prompt tokens per prefill forward between decode steps. prefill_batch: padded
    prompt tokens prefilled together at most (None: 4 * prefill_chunk on the CPU, 32 * on a GPU,
    where a prefill's forward costs about as much for one short prompt as for many).
    batch_prefills: new prompts wait a few steps for others to be prefilled with (None: on a GPU)."""

    max_running: int = attrs.field(default=64, validator=_positive("max_running"))
    max_queue: int = attrs.field(default=1024, validator=_positive("max_queue"))
    kv_budget: int | None = attrs.field(default=None, validator=_positive("kv_budget"))
    prefix_cache_bytes: int | None = None
    prefill_chunk: int = attrs.field(default=512, validator=_positive("prefill_chunk"))
    prefill_batch: int | None = attrs.field(default=None, validator=_positive("prefill_batch"))
    batch_prefills: bool | None = None

    @classmethod
    def make(cls, value: "SchedulerConfig | dict | None") -> "SchedulerConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(attrs.fields_dict(cls)))
            if unknown:
                raise ConfigError(f"unknown scheduler option(s) {', '.join(unknown)}; known: {', '.join(attrs.fields_dict(cls))}")
            return cls(**value)
        raise ConfigError(f"scheduler must be a SchedulerConfig or a dict of its options, got {type(value).__name__}")


class RequestHandle:
    """A submitted request: iterate it (or `astream`) for text pieces, `result()` (or `aresult`)
    for the GenerationResult, `cancel()` to stop it and free its rows."""

    def __init__(self, request_id: int, scheduler: "Scheduler"):
        self.id = request_id
        self._scheduler = scheduler
        self._pieces: list[str] = []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._done = threading.Event()  # result() waits on this alone: the pieces' wakes pass it by
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self.prompt = ""  # the text the model saw (set by the Engine)

    # -- the scheduler's side ----------------------------------------------------------------
    def _push(self, piece: str, wake: bool = True) -> None:
        """Add a piece; without `wake` the scheduler wakes the readers later (wake_handles, once
        a step for every row's piece: one cross-thread call per event loop, not one per piece)."""
        with self._cond:
            self._pieces.append(piece)
            if wake:
                self._wake()

    def _finish(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self._result, self._error = result, error
            self._done.set()
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, event in self._waiters:
            loop.call_soon_threadsafe(event.set)

    # -- the caller's side -------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """Stop the request (idempotent); its result ends with finish_reason "cancelled"."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._scheduler._cancelled()

    def __iter__(self) -> Iterator[str]:
        shown = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda seen=shown: len(self._pieces) > seen or self.done)
                pieces, finished = self._pieces[shown:], self.done
            shown += len(pieces)
            yield from pieces
            if finished and shown == len(self._pieces):
                self._raise_error()
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        self._raise_error()
        return self._result  # type: ignore[return-value]

    async def astream(self) -> AsyncIterator[str]:
        """The text as it comes: each item is every piece that arrived since the last one, joined
        (a reader that falls behind catches up in one item, not one per token)."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._cond:
            self._waiters.append(entry)
        shown = 0
        try:
            while True:
                with self._cond:
                    pieces, finished = self._pieces[shown:], self.done
                    event.clear()
                shown += len(pieces)
                if pieces:
                    yield "".join(pieces)
                if finished and shown == len(self._pieces):
                    self._raise_error()
                    return
                if not pieces:
                    await event.wait()
        finally:
            with self._cond:
                self._waiters.remove(entry)

    async def aresult(self) -> GenerationResult:
        async for _ in self.astream():
            pass
        return self.result()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def wake_handles(handles: Iterable[RequestHandle]) -> None:
    """Wake the readers of handles whose pieces were pushed without waking: threads directly,
    each event loop with one call for all of its handles."""
    events: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for handle in handles:
        with handle._cond:
            handle._cond.notify_all()
            for loop, event in handle._waiters:
                events.setdefault(loop, []).append(event)
    for loop, loop_events in events.items():
        try:
            loop.call_soon_threadsafe(_set_all, loop_events)
        except RuntimeError:  # the loop was closed: nobody is reading there any more
            pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class Row:
    """One decoding row of a request: its sampler, tokens so far and output."""

    def __init__(self, request: "Request", index: int, params: GenerationParams, tokenizer, eos: frozenset[int]):
        self.request, self.index = request, index
        seed = params.sampling.seed
        sampling = attrs.evolve(params.sampling, seed=seed + index) if seed is not None and index else params.sampling
        self.sampler = Sampler(sampling, request.strategy.registry)
        self.plain_greedy = sampling.greedy and not self.sampler.processors
        wants = request.params
        # picks as one argmax array: greedy, no processors, no log-probabilities
        self.plain = self.plain_greedy and not (wants.logprobs or wants.top_logprobs)
        # its next input is known before its pick is read (see Scheduler._pipelines)
        self.pipelines = type(request.policy).propose is RequestPolicy.propose and not self.sampler.processors and not wants.top_logprobs
        self.completion = Completion(tokenizer, params, eos, stream=request.policy.streams)
        self.sequence = list(request.prompt)  # prompt + every sampled token
        self.first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.completion.finished

    def history(self) -> History | None:
        """What the logits processors look at (None when there are none)."""
        if not self.sampler.processors:
            return None
        return History(mx.array([self.sequence], dtype=mx.int32), len(self.request.prompt))


class Request:
    def __init__(self, request_id: int, prompt: Sequence[int], params: GenerationParams, strategy: Strategy,
                 policy: RequestPolicy | None, handle: RequestHandle, positions: int):
        self.id, self.prompt, self.strategy, self.policy = request_id, list(prompt), strategy, policy
        self.params = policy.params if policy is not None else params  # a policy may ask for more (logprobs to score rows)
        self.handle, self.positions = handle, positions
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.admitted_step = 0  # the scheduler's decode steps when admitted
        self.rows: list[Row] = []
        self.cached_tokens = 0
        # prefill progress
        self.cache: list[KVCache] | None = None
        self.filled = 0

    @property
    def n_rows(self) -> int:
        return self.policy.rows if self.policy is not None else 1


class Scheduler:
    """Runs requests on one model (see the module docstring). `submit` is thread-safe."""

    def __init__(self, loaded: LoadedModel, config: SchedulerConfig | dict | None = None):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.config = SchedulerConfig.make(config)
        self.kv_budget = self.config.kv_budget or default_kv_budget()
        prefix_bytes = self.kv_budget // 4 if self.config.prefix_cache_bytes is None else self.config.prefix_cache_bytes
        self.prefix_cache = PrefixCache(prefix_bytes) if prefix_bytes > 0 else None
        self.context_length = loaded.context_length
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        self.prefill_batch = self.config.prefill_batch or (32 if on_gpu else 4) * self.config.prefill_chunk
        self.batch_prefills = on_gpu if self.config.batch_prefills is None else bool(self.config.batch_prefills)
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: deque[Request] = deque()
        self._serial: deque[Request] = deque()
        self._serial_stream: Iterator | None = None
        self._serial_pieces: list[str] = []
        # the batch's rows by slot (the cache's rows); None: a free slot, which a new row takes
        # (see batch_cache.place); there is a live row whenever the list is not empty
        self.rows: list[Row | None] = []
        # counts over the live rows, kept as rows join and leave (not recounted every step)
        self._n_live = self._n_not_plain = self._n_not_pipelined = 0
        self._cancels = False  # a caller cancelled since the loop last looked
        self.cache: list[KVCache] | None = None
        # the rows' next picks, queued but not read: while nothing joins or drafts, the next
        # forward is built from them before they are read, so the device never waits on the host
        self._pending: list[tuple] | mx.array | None = None
        self._unwoken: dict[int, RequestHandle] = {}  # handles given pieces this step, woken at its end
        self.reserved = 0  # positions reserved by admitted requests
        self.counters = dict.fromkeys(("requests_finished", "requests_cancelled", "requests_failed", "prompt_tokens",
                                       "cached_prompt_tokens", "generated_tokens", "decode_steps"), 0)
        self._stop = False
        self._abandoned = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.bytes_per_position = 0
        self.batchable = False
        mx.eval(self.model.parameters())  # nothing lazy crosses to the loop's thread
        self._thread = threading.Thread(target=self._run, name="stratlm-scheduler", daemon=True)
        self._thread.start()
        # stop the loop before the interpreter tears down: a daemon thread still inside MLX at exit
        # aborts the process ("terminate called without an active exception")
        atexit.register(_close_at_exit, weakref.ref(self))
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # -- the callers' side ---------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: GenerationParams, strategy: Strategy) -> RequestHandle:
        if not prompt:
            raise ConfigError("the prompt has no tokens; give at least one token")
        Sampler(params.sampling, strategy.registry)  # bad sampling parameters fail here, in the caller's thread
        policy = strategy.policy(prompt, params) if self.batchable else None
        rows = policy.rows if policy is not None else 1
        length = len(prompt) + params.max_tokens
        if self.context_length is not None:
            length = min(length, self.context_length)
        positions = rows * length
        if positions * self.bytes_per_position > self.kv_budget:
            raise ConfigError(f"the request needs {positions} cached positions ({positions * self.bytes_per_position / GB:.2f} GiB of keys and values); "
                              f"the scheduler's kv_budget is {self.kv_budget / GB:.2f} GiB: lower max_tokens or raise kv_budget")
        with self._lock:
            if self._stop:
                raise StratlmError("the engine is closed; make a new Engine")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(len(self._waiting), self.config.max_queue)
            request_id = next(self._ids)
            handle = RequestHandle(request_id, self)
            self._waiting.append(Request(request_id, prompt, params, strategy, policy, handle, positions))
            self._lock.notify_all()
        return handle

    def metrics(self) -> dict[str, float]:
        with self._lock:
            waiting = len(self._waiting)
        prefix = self.prefix_cache
        return {
            "waiting": waiting,
            "running": self._n_live,
            "prefilling": len(self._prefilling),
            "kv_reserved_bytes": self.reserved * self.bytes_per_position,
            "kv_budget_bytes": self.kv_budget,
            "prefix_cache_bytes": prefix.nbytes if prefix else 0,
            "prefix_cache_hit_rate": prefix.hit_rate if prefix else 0.0,
            **self.counters,
        }

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread and not self._abandoned:
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                _wait_for_os_thread_exit(self._thread)

    def abandon(self, error: BaseException) -> None:
        """The loop's thread is stuck for good (a model split over processes, blocked inside MLX on
        a lost process): answer every request with `error` from the calling thread and stop taking
        new ones. The loop never resumes; close() no longer waits for it."""
        with self._lock:
            self._stop = self._abandoned = True
            requests = {id(r): r for r in [*self._serial, *self._prefilling, *self._waiting, *(row.request for row in self._live())]}
        for request in requests.values():
            self.counters["requests_failed"] += 1
            request.handle._finish(error=error)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _cancelled(self) -> None:
        with self._lock:
            self._cancels = True
            self._lock.notify_all()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._start()
        except BaseException as exc:  # reported to the constructor's caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stop or self._waiting or self._busy())
                if self._stop:
                    break
                cancels, self._cancels = self._cancels, False
                if cancels:
                    self._retire_cancelled_waiting()
                self._admit()
            try:
                self._step(cancels)
            except Exception as exc:  # the batch's state is unknown: fail what ran in it, keep serving
                log.error("scheduler step failed", error=repr(exc))
                self._fail_all(exc)
            finally:
                self._wake_streams()
        self._fail_all(StratlmError("the engine was closed before this request finished"))

    def _start(self) -> None:
        probe = self.model.make_cache()
        self.batchable = all(type(c) is KVCache for c in probe)
        self.model(mx.array([[0]], dtype=mx.int32), probe)
        mx.eval([c.keys for c in probe if c.keys is not None])
        mx.synchronize()  # nothing of the probe left in flight (a model split over processes: its collectives, before another thread's)
        self.bytes_per_position = max(1, sum(c.nbytes for c in probe))

    def _busy(self) -> bool:
        return bool(self.rows or self._prefilling or self._serial or self._cancels)

    def _retire_cancelled_waiting(self) -> None:
        for request in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(request)
            self._finish_cancelled_early(request)

    def _admit(self) -> None:
        budget = self.kv_budget // self.bytes_per_position
        while self._waiting:
            request = self._waiting[0]
            running = self._n_live + sum(r.n_rows for r in self._prefilling)
            if running and (running + request.n_rows > self.config.max_running or self.reserved + request.positions > budget):
                break
            self._waiting.popleft()
            request.admitted = time.perf_counter()
            request.admitted_step = self.counters["decode_steps"]
            self.reserved += request.positions
            (self._prefilling if request.policy is not None else self._serial).append(request)

    def _step(self, cancels: bool = False) -> None:
        # (a prefill reads the queued picks itself, once its own forward is queued behind them)
        if self._pending is not None and (self._serial or cancels):
            self._flush_pending()
        if cancels:
            self._retire_cancelled_running()
        if self._prefilling and self._prefill_due():
            group = self._fresh_group()
            if group:
                self._prefill_together(group)
            else:
                self._prefill_chunk(self._prefilling[0])
        if self._serial:
            self._serial_step()
        if self.rows:
            self._decode_step()
            self._retire_finished()

    # -- prefill ------------------------------------------------------------------------------
    def _prefill_chunk(self, request: Request) -> None:
        prompt = request.prompt
        if request.cache is None:
            hit, state = self.prefix_cache.lookup(prompt) if self.prefix_cache is not None else (0, None)
            request.cache = batch_cache.from_state(state, hit) if state is not None else self.model.make_cache()
            request.filled = request.cached_tokens = hit
        end = min(request.filled + self.config.prefill_chunk, len(prompt) - 1)
        if request.filled < end:
            self.model(mx.array([prompt[request.filled : end]], dtype=mx.int32), request.cache)
            mx.eval([c.keys for c in request.cache] + [c.values for c in request.cache])
            request.filled = end
            if end < len(prompt) - 1:
                return  # the rest after the next decode step
        logits = self.model(mx.array([prompt[-1:]], dtype=mx.int32), request.cache)[:, -1, :]
        self._read_pending_behind(logits)
        self._prefilling.popleft()
        if self.prefix_cache is not None:
            self.prefix_cache.insert(prompt, batch_cache.row_state(request.cache, 0))
        self._start_rows(request)
        picks = [self._pick(row, logits) for row in request.rows]
        self._join(request.cache, request.rows, copies=request.n_rows)
        request.cache = None
        self._emit_picks(request.rows, picks)

    def _prefill_due(self) -> bool:
        """Whether to prefill now (see PREFILL_SHARE): at once while nothing decodes or a prompt is
        part way through, else when enough rows wait to be prefilled or the oldest waited long."""
        live, head = self._n_live, self._prefilling[0]
        if not self.batch_prefills or not live or head.cache is not None:
            return True
        want = min(max(PREFILL_MIN_ROWS, live // PREFILL_SHARE), PREFILL_ROWS, self.config.max_running - live)
        waited = self.counters["decode_steps"] - head.admitted_step
        return sum(r.n_rows for r in self._prefilling) >= want or waited >= PREFILL_WAIT

    def _fresh_group(self) -> list[Request]:
        """Admitted prompts without a cached prefix worth a prefill of their own (MIN_REUSED_PREFIX),
        to prefill together in one left-padded batch of at most prefill_batch padded tokens (a
        longer prompt goes alone, chunk by chunk)."""
        group: list[Request] = []
        alone = len(self._prefilling) == 1
        for request in self._prefilling:
            if request.cache is not None:
                break
            hit, state = self.prefix_cache.lookup(request.prompt) if self.prefix_cache is not None else (0, None)
            # a short cached prefix (a chat template's system lines) is recomputed when the prompt
            # can be prefilled with others: a prompt with a cached prefix is prefilled alone
            if state is not None and (alone or hit >= MIN_REUSED_PREFIX):
                request.cache = batch_cache.from_state(state, hit)
                request.filled = request.cached_tokens = hit
                break
            width = bucket(max(len(r.prompt) for r in [*group, request]))
            if width * (len(group) + 1) > self.prefill_batch:
                if not group:
                    request.cache = self.model.make_cache()  # alone, chunk by chunk
                break
            group.append(request)
        return group

    def _prefill_together(self, group: list[Request]) -> None:
        width = bucket(max(len(r.prompt) for r in group))
        padding = [width - len(r.prompt) for r in group]
        # padded with the row's own first token (masked; the penalties' history is the prompt alone)
        tokens = mx.array([[r.prompt[0]] * pad + r.prompt for r, pad in zip(group, padding)], dtype=mx.int32)
        cache = self.model.make_cache(left_padding=padding)
        logits = prefill(self.model, tokens, cache, self.config.prefill_chunk)
        self._read_pending_behind(logits)
        picks = []
        for j, request in enumerate(group):
            if self.prefix_cache is not None:
                self.prefix_cache.insert(request.prompt, batch_cache.row_state(cache, j))
            self._start_rows(request)
            picks += [self._pick(row, logits[j : j + 1]) for row in request.rows]
        new_rows = [row for request in group for row in request.rows]
        self._join(cache, new_rows, copies=[r.n_rows for r in group])
        for _ in group:  # only now: a failure before this leaves them where _fail_all finds them
            self._prefilling.popleft()
        self._emit_picks(new_rows, picks)

    def _read_pending_behind(self, logits: mx.array) -> None:
        """Before rows join: queue the new rows' prefill, then read the batch's queued picks. The
        device runs the prefill right after the step in flight; the host built it meanwhile."""
        if self._pending is not None:
            mx.async_eval(logits)
            self._flush_pending()

    def _start_rows(self, request: Request) -> None:
        policy = request.policy
        request.rows = [Row(request, i, policy.params, self.tokenizer, self.loaded.eos_token_ids) for i in range(policy.rows)]
        self.counters["prompt_tokens"] += len(request.prompt)
        self.counters["cached_prompt_tokens"] += request.cached_tokens

    def _live(self) -> list[Row]:
        return [row for row in self.rows if row is not None]

    def _free_slots(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is None]

    def _join(self, cache: list[KVCache], new_rows: list[Row], copies: int | list[int]) -> None:
        """The new rows' cache into the batch: into free slots, the batch growing by at least half
        again when there are too few (up to max_running rows), so that later joins find slots."""
        room = self._room(new_rows)
        self._count(new_rows, 1)
        if self.cache is None:
            self.cache, self.rows = batch_cache.join(None, cache, copies=copies, room=room), list(new_rows)
            return
        free = self._free_slots()
        stored = len(self.rows)
        if len(new_rows) > len(free):
            needed = stored + len(new_rows) - len(free)
            size = max(needed, min(stored + stored // 2, self.config.max_running))
            free += range(stored, size)
            self.rows += [None] * (size - stored)
        slots = free[: len(new_rows)]
        self.cache = batch_cache.place(self.cache, cache, slots, copies=copies, free=free, rows=len(self.rows), room=room)
        for slot, row in zip(slots, new_rows):
            self.rows[slot] = row

    def _count(self, rows: list[Row], sign: int) -> None:
        self._n_live += sign * len(rows)
        self._n_not_plain += sign * sum(not row.plain for row in rows)
        self._n_not_pipelined += sign * sum(not row.pipelines for row in rows)

    def _forward(self, tokens: mx.array) -> mx.array:
        """The batch's forward on tokens (rows, width): the storage rebuilt first if it is full."""
        if not batch_cache.has_room(self.cache, tokens.shape[1]):  # (the room is counted only then)
            self.cache = batch_cache.ensure_room(self.cache, tokens.shape[1], self._free_slots(), room=self._room([]))
        return self.model(tokens, self.cache)

    def _room(self, new_rows: list[Row]) -> int:
        """Positions a joined batch keeps free: the most any of its rows may still write (its
        tokens left, with room for a few draft tokens), at most MAX_ROOM and half of a row's share
        of the KV budget (every row gets the room; beyond it, the storage grows)."""
        rows = [*self._live(), *new_rows]
        left = max(row.request.params.max_tokens - len(row.completion.tokens) for row in rows)
        share = self.kv_budget // (2 * self.bytes_per_position * len(rows))
        return max(batch_cache.SPARE, min(MAX_ROOM, share, left + batch_cache.SPARE))

    # -- decode -------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        rows = self.rows
        if self._pending is not None:
            picks, self._pending = self._pending, None
        else:
            drafts = [self._propose(row) if row is not None else [] for row in rows]
            width = 1 + max(len(d) for d in drafts)
            last = [row.sequence[-1] if row is not None else 0 for row in rows]  # a free slot's token: any
            inputs = [[token, *d] + [token] * (width - 1 - len(d)) for token, d in zip(last, drafts)]
            logits = self._forward(mx.array(inputs, dtype=mx.int32))  # (rows, width, vocab)
            self.counters["decode_steps"] += 1
            if width > 1:
                return self._verify_step(rows, drafts, width, logits)
            picks = self._picks(logits[:, 0, :])
        if self._pipelines():
            # queue the next step on the picks not yet read (a row that turns out finished
            # costs one wasted position, dropped when it retires)
            if isinstance(picks, mx.array):
                tokens = picks[:, None]
            else:  # a free slot's input: any token
                tokens = mx.concatenate([pick[0] if pick is not None else mx.zeros((1,), dtype=mx.int32) for pick in picks])[:, None]
            self._pending = self._picks(self._forward(tokens)[:, 0, :])
            self.counters["decode_steps"] += 1
            pending = self._pending
            mx.async_eval(pending if isinstance(pending, mx.array) else [x for pick in pending if pick is not None for x in pick[:2] if x is not None])
        self._emit_picks(rows, picks)

    def _picks(self, logits: mx.array) -> list[tuple | None] | mx.array:
        """Each batch row's next token from its logits row (rows, vocab), lazily: (token, logprob,
        top) per row (None for a free slot), or when every row is plain greedy without
        log-probabilities, the tokens as one (rows,) array (one node to build and one read a step,
        not one per row). The argmax is a lazy node: unused, it is never computed."""
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        if not self._n_not_plain:
            return greedy
        return [None if row is None else self._pick(row, logits[i : i + 1], greedy[i : i + 1] if row.plain_greedy else None)
                for i, row in enumerate(self.rows)]

    def _pipelines(self) -> bool:
        """Whether the next step's input is known before this step's picks are read: every row
        takes one token a step and samples without looking at its history. Prompts waiting to be
        prefilled keep the pipeline: their rows join after the queued picks are read
        (_read_pending_behind), as a retiring row's slot is freed after they are."""
        return not self._serial and not self._n_not_pipelined

    def _flush_pending(self) -> None:
        """Read and emit the queued picks, so that rows may join, leave or draft again."""
        picks, self._pending = self._pending, None
        self._emit_picks(self.rows, picks)
        self._retire_finished()

    def _verify_step(self, rows: list[Row], drafts: list[list[int]], width: int, logits: mx.array) -> None:
        """Rows with draft tokens check them all in this forward (logits (rows, width, vocab))."""
        drops, outputs = [], []
        for i, (row, drafted) in enumerate(zip(rows, drafts)):
            if row is None or not drafted:
                outputs.append(None)
                drops.append(width - 1)
                continue
            checked = process_positions(logits[i, : len(drafted) + 1], row.sequence, drafted, row.sampler, len(row.request.prompt))
            accepted, following = verify(checked, drafted, None, row.sampler)
            row.request.policy.verified(row.index, len(drafted), accepted)
            out = drafted[:accepted] + [following]
            outputs.append((out, logits[i, : len(out)]))
            drops.append(width - 1 - accepted)
        plain = [self._pick(row, logits[i : i + 1, 0, :]) if outputs[i] is None and row is not None else None for i, row in enumerate(rows)]
        plain_read = iter(self._read([p for p in plain if p is not None]))
        batch_cache.drop_newest(self.cache, drops)
        for row, output in zip(rows, outputs):
            if row is None:
                continue
            if output is None:
                self._emit(row, [next(plain_read)])
            else:
                out, out_logits = output
                self._emit(row, self._scored(row, out, out_logits))

    def _propose(self, row: Row) -> list[int]:
        completion, params = row.completion, row.request.params
        budget = params.max_tokens - len(completion.tokens) - 1
        if self.context_length is not None:
            budget = min(budget, self.context_length - len(row.sequence) - 1)
        if budget <= 0 or completion.finished:
            return []
        return list(row.request.policy.propose(row.index, row.sequence, budget))[:budget]

    def _pick(self, row: Row, logits: mx.array, token: mx.array | None = None) -> tuple:
        """The row's next token from logits (1, vocab), lazily, with what the params ask for."""
        if token is None:
            token = row.sampler.sample(logits, row.history())
        params = row.request.params
        lp = token_logprobs(logits, token) if params.logprobs or params.top_logprobs else None
        top = top_logprobs(logits, params.top_logprobs) if params.top_logprobs else None
        return token, lp, top

    @staticmethod
    def _read(picks: list[tuple | None] | mx.array) -> list[tuple[int, float | None, dict[int, float] | None] | None]:
        if isinstance(picks, mx.array):
            return [(token, None, None) for token in picks.tolist()]
        picks_made = [pick for pick in picks if pick is not None]
        mx.eval([x for pick in picks_made for x in pick if x is not None and not isinstance(x, tuple)] +
                [x for pick in picks_made if pick[2] is not None for x in pick[2]])
        out = []
        for pick in picks:
            if pick is None:
                out.append(None)
                continue
            token, lp, top = pick
            top_dict = dict(zip(top[0][0].tolist(), top[1][0].tolist())) if top is not None else None
            out.append((int(token.item()), float(lp.item()) if lp is not None else None, top_dict))
        return out

    def _emit_picks(self, rows: list[Row], picks: list[tuple] | mx.array) -> None:
        """Read one pick per row (waiting for the device) and emit each row's token."""
        for row, choice in zip(rows, self._read(picks)):
            if row is not None:
                self._emit(row, [choice])

    def _scored(self, row: Row, tokens: list[int], logits: mx.array) -> list[tuple]:
        """Log-probabilities of verified tokens (logits: (n, vocab) at their positions)."""
        params = row.request.params
        if not (params.logprobs or params.top_logprobs):
            return [(t, None, None) for t in tokens]
        lps = token_logprobs(logits, mx.array(tokens, dtype=mx.int32)).tolist()
        tops = [None] * len(tokens)
        if params.top_logprobs:
            ids, values = top_logprobs(logits, params.top_logprobs)
            tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return list(zip(tokens, lps, tops))

    def _emit(self, row: Row, choices: list[tuple]) -> None:
        request, completion = row.request, row.completion
        if row.first_token_time is None:
            row.first_token_time = time.perf_counter()
        for token, lp, top in choices:
            if completion.finished:
                break
            row.sequence.append(token)
            self.counters["generated_tokens"] += 1
            piece = completion.add(token, lp if request.params.logprobs else None, top)
            if not completion.finished and self.context_length is not None and len(row.sequence) >= self.context_length:
                piece += completion.end("length")
            if piece and request.policy.streams:
                request.handle._push(piece, wake=False)
                self._unwoken[request.id] = request.handle

    # -- retiring -----------------------------------------------------------------------------
    def _wake_streams(self) -> None:
        handles, self._unwoken = self._unwoken.values(), {}
        wake_handles(handles)

    def _retire_cancelled_running(self) -> None:
        for row in self._live():
            if row.request.handle.cancelled and not row.finished:
                row.completion.end("cancelled")
        for request in [r for r in self._prefilling if r.handle.cancelled]:
            self._prefilling.remove(request)
            self.reserved -= request.positions
            self._finish_cancelled_early(request)
        self._retire_finished()

    def _retire_finished(self) -> None:
        gone = [(i, row) for i, row in enumerate(self.rows) if row is not None and row.finished]
        if not gone:
            return
        if self.prefix_cache is not None:
            for i, row in gone:
                if row.request.n_rows == 1 and row.completion.finish_reason != "cancelled":
                    held = self.cache[0].offset - batch_cache.padding_of(self.cache[0])[i]
                    self.prefix_cache.insert(row.sequence[:held], batch_cache.row_state(self.cache, i))
        for i, _ in gone:
            self.rows[i] = None
        self._count([row for _, row in gone], -1)
        keep = [i for i, row in enumerate(self.rows) if row is not None]
        if not keep:
            self.rows, self.cache, self._pending = [], None, None
        elif 2 * len(keep) <= len(self.rows) and not self._prefilling and not self._waiting:
            # half the slots free and nobody to take them: the free ones would cost compute at every step
            self.rows = [self.rows[i] for i in keep]
            if isinstance(self._pending, mx.array):
                self._pending = self._pending[mx.array(keep, dtype=mx.int32)]
            elif self._pending is not None:
                self._pending = [self._pending[i] for i in keep]
            for layer in self.cache:
                layer.filter(keep)
        else:
            batch_cache.release(self.cache, [i for i, _ in gone])
        for request in {id(row.request): row.request for _, row in gone}.values():
            if all(r.finished for r in request.rows):
                self._finish_request(request)

    def _finish_request(self, request: Request) -> None:
        self.reserved -= request.positions
        end = time.perf_counter()
        results = []
        for row in request.rows:
            first = row.first_token_time or end
            stats = GenerationStats(
                prompt_tokens=len(request.prompt),
                generation_tokens=max(0, row.completion.generated - 1),
                prompt_time=first - (request.admitted or request.submitted),
                generation_time=end - first,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                cached_prompt_tokens=request.cached_tokens,
                queue_time=(request.admitted or end) - request.submitted,
            )
            results.append(row.completion.result(stats))
        cancelled = request.handle.cancelled or any(r.finish_reason == "cancelled" for r in results)
        try:
            result = request.policy.finish(results)
            if cancelled:
                result = attrs.evolve(result, finish_reason="cancelled")
        except Exception as exc:
            self.counters["requests_failed"] += 1
            request.handle._finish(error=RequestFailedError(f"strategy {request.strategy.name!r} failed to combine its rows: {exc!r}"))
            return
        if not request.policy.streams and result.text:
            request.handle._push(result.text)
        self.counters["requests_cancelled" if cancelled else "requests_finished"] += 1
        request.handle._finish(result)

    def _finish_cancelled_early(self, request: Request) -> None:
        self.counters["requests_cancelled"] += 1
        request.handle._finish(GenerationResult(text="", token_ids=(), finish_reason="cancelled",
                                                stats=GenerationStats(prompt_tokens=len(request.prompt))))

    def _fail_all(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, StratlmError) else RequestFailedError(f"the engine failed while decoding: {exc!r}")
        requests = {id(r.request): r.request for r in self._live()}
        for request in [*requests.values(), *self._prefilling, *self._serial, *self._waiting]:
            self.counters["requests_failed"] += 1
            request.handle._finish(error=error)
        self.rows, self.cache, self.reserved, self._pending = [], None, 0, None
        self._n_live = self._n_not_plain = self._n_not_pipelined = 0
        self._prefilling.clear()
        self._serial.clear()
        self._waiting.clear()
        self._close_serial_stream()

    # -- strategies without a policy ------------------------------------------------------------
    def _serial_step(self) -> None:
        """One item of the oldest serial request's own stream (interleaved with batch steps)."""
        request = self._serial[0]
        if self._serial_stream is None:
            self._serial_stream = iter(request.strategy.stream(request.prompt, request.params))
            self._serial_pieces = []
        done: GenerationResult | None = None
        try:
            if request.handle.cancelled:
                self._serial_stream.close()
                done = GenerationResult(text="".join(self._serial_pieces), token_ids=(), finish_reason="cancelled")
            else:
                item = next(self._serial_stream)
                if isinstance(item, GenerationResult):
                    done = item
                else:
                    self._serial_pieces.append(item)
                    request.handle._push(item)
        except StopIteration:
            done = GenerationResult(text="".join(self._serial_pieces), token_ids=(), finish_reason="stop")
        except Exception as exc:
            self._end_serial(request)
            self.counters["requests_failed"] += 1
            request.handle._finish(error=exc if isinstance(exc, StratlmError) else RequestFailedError(f"strategy {request.strategy.name!r} failed: {exc!r}"))
            return
        if done is not None:
            self._end_serial(request)
            self.counters["requests_cancelled" if done.finish_reason == "cancelled" else "requests_finished"] += 1
            self.counters["prompt_tokens"] += len(request.prompt)
            self.counters["generated_tokens"] += len(done.token_ids)
            request.handle._finish(done)

    def _end_serial(self, request: Request) -> None:
        self._serial.popleft()
        self._close_serial_stream()
        self.reserved -= request.positions

    def _close_serial_stream(self) -> None:
        """Close the strategy's stream now, on this thread: its `finally` blocks run here (a split
        model's stream holds the engine's drive lock until then), not whenever it is collected."""
        stream, self._serial_stream = self._serial_stream, None
        close = getattr(stream, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # the request is over already; a failing cleanup is logged, not raised
                log.warning("closing a strategy's stream failed", error=repr(exc))


def _wait_for_os_thread_exit(thread: threading.Thread, timeout: float = 5.0) -> None:
    """join() returns before the OS thread runs its C++ thread-local destructors. MLX keeps a
    compile cache per thread whose entries release Python objects then; if the interpreter is
    finalizing by that time, the thread exits inside a destructor and the process aborts
    ("terminate called without an active exception"). Wait until the OS thread is gone (Linux)."""
    if thread.native_id is None or not os.path.isdir("/proc/self/task"):
        return
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.001)


def _close_at_exit(ref: "weakref.ref[Scheduler]") -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close()


def top_logprobs(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k most likely tokens and their log-probabilities: logits (n, vocab) -> ((n, k), (n, k))."""
    logprobs = log_softmax(logits.astype(mx.float32))
    ids = mx.argsort(-logprobs, axis=-1)[:, :k]
    return ids, mx.take_along_axis(logprobs, ids, axis=-1)
