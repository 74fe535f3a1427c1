"""Running a model split over processes: rank 0 drives, the others follow.

Rank 0 holds the tokenizer, the strategy and the output. Its model (`ParallelModel`) is an
ordinary Model to the strategy: each forward first posts a command to the other ranks (the batch
shape, the cache to use, and the cache operations the strategy did since the last forward:
new caches, trims, filtered rows), then runs rank 0's part. The other ranks wait in `serve`,
replay the cache operations on their own caches (their heads, or their blocks) and run their part
of the same forward. Commands travel as all-sums of int32 arrays (the others add zeros), so one
collective primitive serves every backend; each rank's caches stay local.

Every collective a forward needs is queued on rank 0 (mx.async_eval) inside the forward itself,
in the same order the other ranks run them, whether or not the strategy evaluates that forward's
logits (a prompt's chunks only fill the cache): the ranks never disagree on which collective
comes next, and the host still queues step t+1 before reading token t.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import signal
import threading
import weakref
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from stratlm.backends.cpu.quantized import adopt
from stratlm.core.cache import KVCache
from stratlm.core.errors import ConfigError
from stratlm.core.model import Model, attention_mask

from .group import group_lost, lost_error, peer_errors, watchdog
from .plan import ShardPlan, split

HEADER = 8  # int32 words: command, B, L, payload length, cache id, micro-batches, ops length
FORWARD, STOP = 1, 2
NEW, TRIM, FILTER, FREE = 1, 2, 3, 4
NO_CACHE = -1


class Channel:
    """Rank 0's commands to the others: a fixed-size header, then its payload (both all-sums)."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group

    def post(self, header: Sequence[int], payload: mx.array | None = None) -> list[mx.array]:
        words = list(header) + [0] * (HEADER - len(header))
        sent = [mx.distributed.all_sum(mx.array(words, dtype=mx.int32), group=self.group)]
        mx.async_eval(sent[0])
        if payload is not None and payload.size:
            # one eval each, in order: within one eval MLX may run independent collectives in any order
            sent.append(mx.distributed.all_sum(mx.depends(payload.astype(mx.int32), sent[0]), group=self.group))
            mx.async_eval(sent[1])
        return sent

    def receive(self) -> tuple[list[int], mx.array | None]:
        header = mx.distributed.all_sum(mx.zeros((HEADER,), dtype=mx.int32), group=self.group)
        words = header.tolist()
        if words[0] != STOP and words[3]:
            payload = mx.distributed.all_sum(mx.zeros((words[3],), dtype=mx.int32), group=self.group)
            mx.eval(payload)
            return words, payload
        return words, None


# -- row-parallel layers: the partial products of all ranks summed ------------------------------------
_summed: dict[type, type] = {}


def summed(layer: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """The same layer (same parameters and names) whose output is all-summed over the group: the
    row-parallel o_proj and down_proj, each rank holding some of their input columns."""
    cls = type(layer)
    if cls not in _summed:
        def __call__(self, x: mx.array) -> mx.array:
            return mx.distributed.all_sum(cls.__call__(self, x), group=self.group)

        _summed[cls] = type(f"Summed{cls.__name__}", (cls,), {"__call__": __call__})
    new = adopt(_summed[cls], layer)
    new.group = group
    return new


def wire_tensor_parallel(model: Model, group: mx.distributed.Group) -> None:
    for block in model.layers:
        block.self_attn.o_proj = summed(block.self_attn.o_proj, group)
        block.mlp.down_proj = summed(block.mlp.down_proj, group)


# -- forwards shared by rank 0 and the others ----------------------------------------------------------
def run_blocks(layers: Sequence[nn.Module], h: mx.array, caches: Sequence[KVCache] | None) -> mx.array:
    # one mask for every block: the families split here (plan.FAMILIES) have no per-layer windows
    mask = attention_mask(h.shape[1], caches[0] if caches else None)
    for i, block in enumerate(layers):
        h = block(h, mask, caches[i] if caches else None)
    return h


class RowSlice(KVCache):
    """Rows [lo, hi) of a layer's cache, for one micro-batch: it writes and reads those rows of the
    parent's storage, for which room was made for the whole batch beforehand."""

    def __init__(self, parent: KVCache, lo: int, hi: int, start: int):
        self.parent, self.lo, self.hi = parent, lo, hi
        self.keys = self.values = None
        self.offset = start
        self.left_padding = None if parent.left_padding is None else parent.left_padding[lo:hi]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        p, start, end = self.parent, self.offset, self.offset + keys.shape[2]
        p.keys[self.lo : self.hi, :, start:end] = keys
        p.values[self.lo : self.hi, :, start:end] = values
        self.offset = end
        return p.keys[self.lo : self.hi, :, :end], p.values[self.lo : self.hi, :, :end]


def micro_batch_caches(layers: Sequence[nn.Module], caches: Sequence[KVCache] | None, ranges: list[tuple[int, int]], L: int,
                       dtype: mx.Dtype) -> list[Sequence[KVCache] | None]:
    """Per micro-batch, the caches its rows use (the caches themselves for one micro-batch)."""
    if caches is None or len(ranges) == 1:
        return [caches] * len(ranges)
    B = ranges[-1][1]
    per = [[] for _ in ranges]
    for block, cache in zip(layers, caches):
        attn = block.self_attn
        start = cache.offset
        shape = mx.zeros((B, attn.n_kv_heads, L, attn.head_dim), dtype)  # shapes only: never evaluated
        cache.make_room(shape, shape)
        for j, (lo, hi) in enumerate(ranges):
            per[j].append(RowSlice(cache, lo, hi, start))
    return per


# -- rank 0's caches: its own, recording what the strategy does to them -------------------------------
class OpLog:
    """Cache operations since the last forward, as int32 words: op, cache id, layer, n, args..."""

    def __init__(self):
        self.words: list[int] = []
        self.lock = threading.Lock()  # a cache freed by the garbage collector records from whatever thread runs it

    def record(self, op: int, cache_id: int, layer: int = -1, args: Sequence[int] = ()) -> None:
        with self.lock:
            self.words.extend([op, cache_id, layer, len(args), *args])

    def take(self) -> list[int]:
        with self.lock:
            words, self.words = self.words, []
        return words


class RecordingCache(KVCache):
    """A KVCache of rank 0's part of one layer, telling the other ranks of every trim and filter."""

    def __init__(self, log: OpLog, cache_id: int, layer: int, left_padding: Sequence[int] | None):
        super().__init__(left_padding)
        self._log, self._cache_id, self._layer = log, cache_id, layer

    def trim(self, n: int) -> int:
        self._log.record(TRIM, self._cache_id, self._layer, [int(n)])
        return super().trim(n)

    def filter(self, rows: Sequence[int] | mx.array) -> None:
        rows = [int(r) for r in (rows.tolist() if isinstance(rows, mx.array) else rows)]
        self._log.record(FILTER, self._cache_id, self._layer, rows)
        super().filter(rows)


class RemoteCache(RecordingCache):
    """Stands for a layer another rank holds (pipeline): records, counts positions, stores nothing."""

    def filter(self, rows: Sequence[int] | mx.array) -> None:
        super().filter(rows)
        if self.left_padding is not None:
            shift = int(self.left_padding.min().item()) if self.left_padding.size else 0
            self.offset -= shift
            self.left_padding = self.left_padding - shift if shift else self.left_padding


class CacheList(list):
    """make_cache's result: one cache a layer, and the id the other ranks know it by."""

    def __init__(self, caches: list[KVCache], cache_id: int):
        super().__init__(caches)
        self.cache_id = cache_id


class ParallelModel(Model):
    """Rank 0's view of a model split over the group (see the module's docstring). `local` is rank
    0's part: all blocks with its share of heads and columns (tensor), or its run of blocks (pipeline),
    with the embedding, final norm and head in both cases."""

    @property
    def split_over_processes(self) -> str:
        """How the model is split ("tensor" or "pipeline"): the Engine drives such a model directly."""
        return self.plan.mode

    def __init__(self, local: Model, plan: ShardPlan, group: mx.distributed.Group, config: dict[str, Any], dtype: mx.Dtype,
                 micro_batches: int | None = None):
        super().__init__()
        self.local = local
        self.config = dict(config)
        self.plan, self.group, self.dtype = plan, group, dtype
        self.micro_batches = micro_batches
        self.channel = Channel(group)
        self.log = OpLog()
        self.ids = itertools.count()
        self.closed = False
        self.watchdog = watchdog(0)
        atexit.register(self.close)

    # -- the Model interface -------------------------------------------------------------------------
    @property
    def layers(self) -> list[nn.Module]:
        return self.local.layers

    def set_layers(self, blocks: list[nn.Module]) -> None:
        raise ConfigError("a model split over processes cannot have its blocks replaced; apply transforms before splitting (save the result, then load it)")

    def embed(self, tokens: mx.array) -> mx.array:
        return self.local.embed(tokens)

    def head(self, hidden: mx.array) -> mx.array:
        return self.local.head(hidden)

    def hidden_states(self, tokens: mx.array) -> list[mx.array]:
        raise ConfigError("hidden_states is not available on a model split over processes")

    def make_cache(self, left_padding: Sequence[int] | None = None) -> CacheList:
        cache_id = next(self.ids)
        padding = [int(p) for p in left_padding] if left_padding is not None else []
        self.log.record(NEW, cache_id, -1, padding)
        mine = self.local_layers()
        caches = [(RecordingCache if layer in mine else RemoteCache)(self.log, cache_id, layer, left_padding)
                  for layer in range(int(self.config["num_hidden_layers"]))]
        out = CacheList(caches, cache_id)
        weakref.finalize(out, self.log.record, FREE, cache_id)
        return out

    def local_layers(self) -> range:
        n = int(self.config["num_hidden_layers"])
        return range(*self.plan.layers) if self.plan.mode == "pipeline" else range(n)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if self.closed:
            raise ConfigError("this model's process group was closed; load it again")
        lost = lost_error()
        if lost is not None:  # a collective on a broken group may never return: fail at once
            raise type(lost)(str(lost))
        if cache is not None and not isinstance(cache, CacheList):
            raise ConfigError("a model split over processes needs the caches its make_cache() returns (is STRATLM_COMPILE=on? it is not supported here)")
        cache_id = cache.cache_id if cache is not None else NO_CACHE
        tokens = tokens.astype(mx.int32)
        B, L = tokens.shape
        ops = self.log.take()
        mine = self.local_layers()
        self.watchdog.kick()  # a forward issued: the previous one went through
        local_caches = [cache[i] for i in mine] if cache is not None else None
        with peer_errors(0):
            if self.plan.mode == "tensor":
                payload = mx.concatenate([mx.array(ops, dtype=mx.int32), tokens.reshape(-1)])
                self.channel.post([FORWARD, B, L, payload.size, cache_id, 1, len(ops)], payload)
                h = run_blocks(self.local.layers, self.local.embed(tokens), local_caches)
                mx.async_eval(h)  # queues this forward's all-sums now, before any later command
                return self.local.head(h)
            m = min(B, self.micro_batches or self.plan.size)
            self.channel.post([FORWARD, B, L, len(ops), cache_id, m, len(ops)], mx.array(ops, dtype=mx.int32) if ops else None)
            hidden = self.pipeline_forward(self.local.embed(tokens), local_caches, m)
        if cache is not None:
            for i, c in enumerate(cache):
                if i not in mine:
                    c.offset += L
        return self.local.head(hidden)

    def pipeline_forward(self, h: mx.array, caches: list[KVCache] | None, m: int) -> mx.array:
        """Rank 0's blocks for each micro-batch, sent on to rank 1; the last rank's output comes back.
        With K = size - 1 micro-batches in flight before rank 0 waits for the first to return, no two
        ranks ever wait on each other's send (safe even where a send blocks until received)."""
        B, L, D = h.shape
        ranges = split(B, m)
        per = micro_batch_caches(self.local.layers, caches, ranges, L, h.dtype)
        size, outs = self.plan.size, [None] * m
        in_flight = size - 1

        def receive(j: int) -> None:
            lo, hi = ranges[j]
            outs[j] = mx.distributed.recv((hi - lo, L, D), h.dtype, size - 1, group=self.group)
            mx.async_eval(outs[j])

        for j, (lo, hi) in enumerate(ranges):
            x = run_blocks(self.local.layers, h[lo:hi], per[j])
            mx.async_eval(x)
            if j >= in_flight:
                receive(j - in_flight)
            mx.async_eval(mx.distributed.send(x, 1, group=self.group))
        for j in range(max(0, m - in_flight), m):
            receive(j)
        return outs[0] if m == 1 else mx.concatenate(outs, axis=0)

    def close(self) -> None:
        """Tell the other ranks to stop (also done at exit)."""
        if self.closed:
            return
        self.closed = True
        if group_lost():
            return  # a collective on a broken group may never return
        try:
            mx.eval(self.channel.post([STOP]))
        except RuntimeError:
            pass  # they are gone already


# -- the other ranks ---------------------------------------------------------------------------------
def apply_ops(words: list[int], caches: dict[int, dict[int, KVCache]], layers: range) -> None:
    i = 0
    while i < len(words):
        op, cache_id, layer, n = words[i : i + 4]
        args = words[i + 4 : i + 4 + n]
        i += 4 + n
        if op == NEW:
            caches[cache_id] = {g: KVCache(args or None) for g in layers}
        elif op == FREE:
            caches.pop(cache_id, None)
        elif layer in caches.get(cache_id, {}):
            if op == TRIM:
                caches[cache_id][layer].trim(args[0])
            elif op == FILTER:
                caches[cache_id][layer].filter(args)


def serve(local: Model, plan: ShardPlan, group: mx.distributed.Group, config: dict[str, Any], dtype: mx.Dtype) -> None:
    """Follow rank 0's commands until it stops (returns) or is gone (DistributedError). Ctrl-C is
    ignored here: in `mlx.launch`'s terminal it reaches every rank, and rank 0 ends the others
    (its stop message) once it has finished what it was doing."""
    with ignoring_interrupts():
        follow(local, plan, group, config, dtype)


@contextlib.contextmanager
def ignoring_interrupts():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def follow(local: Model, plan: ShardPlan, group: mx.distributed.Group, config: dict[str, Any], dtype: mx.Dtype) -> None:
    channel = Channel(group)
    caches: dict[int, dict[int, KVCache]] = {}
    layers = range(*plan.layers) if plan.mode == "pipeline" else range(int(config["num_hidden_layers"]))
    hidden_size = int(config["hidden_size"])
    rank, size = plan.rank, plan.size
    watch = watchdog(rank)
    with peer_errors(rank):
        while True:
            watch.disarm()  # waiting for rank 0's next command may take as long as it likes
            (command, B, L, _, cache_id, m, n_ops, _), payload = channel.receive()
            if command == STOP:
                return
            watch.arm()
            words = payload[:n_ops].tolist() if n_ops else []
            apply_ops(words, caches, layers)
            local_caches = [caches[cache_id][g] for g in layers] if cache_id != NO_CACHE else None
            if plan.mode == "tensor":
                tokens = payload[n_ops:].reshape(B, L)
                mx.eval(run_blocks(local.layers, local.embed(tokens), local_caches))
                continue
            ranges = split(B, m)
            per = micro_batch_caches(local.layers, local_caches, ranges, L, dtype)
            for j, (lo, hi) in enumerate(ranges):
                x = mx.distributed.recv((hi - lo, L, hidden_size), dtype, rank - 1, group=group)
                y = run_blocks(local.layers, x, per[j])
                mx.eval(mx.distributed.send(y, (rank + 1) % size, group=group))
