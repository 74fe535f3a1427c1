"""Row surgery on a batch's per-layer KVCaches, for continuous batching.

Rows of a batch are aligned at the right: every row's newest position is the cache's
`offset - 1`, and a row that holds fewer positions is left-padded (its `left_padding`, masked
by attention, and its RoPE offset is its own). With that one invariant, rows join (`join`),
leave (KVCache.filter), and forget a different number of newest positions each (`drop_newest`,
for speculative rows that rejected different numbers of draft tokens).

A long-lived batch (the scheduler's) keeps its rows as slots instead: a finished row's slot is
freed (`release`) and a new row is written into a free slot (`place`), in place, so neither
copies the other rows' storage. The storage is rebuilt (every row copied) only when it must:
more slots, a new row longer than the batch's width, or no room left (`ensure_room`, which
also drops the columns no live row needs).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from stratlm.core.cache import KVCache


def padding_of(cache: KVCache) -> list[int]:
    return list(cache.padding_list(0 if cache.keys is None else cache.keys.shape[0]))


def set_padding(cache: KVCache, padding: Sequence[int]) -> None:
    cache.set_left_padding(padding)


SPARE = 64  # positions of room a joined cache gets, so the next steps do not grow (copy) it at once


def join(batch: list[KVCache] | None, new: list[KVCache], copies: int | Sequence[int] = 1, room: int = SPARE) -> list[KVCache]:
    """The batch with the rows of `new` appended after its rows, row r of `new` repeated
    `copies` (or copies[r]) times.

    Both are aligned at the right (the shorter one gains left padding); storage holds the
    positions in use and `room` more (the most any row will still write: no growth, which
    copies the whole batch's storage, while they decode)."""
    rows = new[0].keys.shape[0]
    taken = _repeated(rows, copies)
    if taken != list(range(rows)):
        new = [_take_rows(c, taken) for c in new]
    if not batch or batch[0].keys is None:
        return [_with_room(_trimmed(c), room) for c in new]
    joined = []
    for old_layer, new_layer in zip(batch, new):
        width = max(old_layer.offset, new_layer.offset)
        keys, values, padding = [], [], []
        for layer in (old_layer, new_layer):
            shift = width - layer.offset
            k, v = layer.keys[:, :, : layer.offset], layer.values[:, :, : layer.offset]
            if shift:
                pad = [(0, 0), (0, 0), (shift, 0), (0, 0)]
                k, v = mx.pad(k, pad), mx.pad(v, pad)
            keys.append(k)
            values.append(v)
            padding += [p + shift for p in padding_of(layer)]
        cache = KVCache()
        cache.keys, cache.values, cache.offset = mx.concatenate(keys, axis=0), mx.concatenate(values, axis=0), width
        set_padding(cache, padding)
        joined.append(_with_room(cache, room))
    mx.eval([c.keys for c in joined] + [c.values for c in joined])
    return joined


def place(batch: list[KVCache], new: list[KVCache], slots: Sequence[int], copies: int | Sequence[int] = 1,
          free: Sequence[int] = (), rows: int = 0, room: int = SPARE) -> list[KVCache]:
    """Write the rows of `new` (row r repeated `copies` or copies[r] times) into the batch's rows
    `slots`: free ones (listed in `free`, with any others not in use) or ones past the last (the
    batch grows to them, or to `rows` rows). Only the new rows are written unless the storage must
    be rebuilt."""
    new_rows = new[0].keys.shape[0]
    taken = _repeated(new_rows, copies)
    if len(taken) != len(slots):
        raise ValueError(f"{len(taken)} new rows for {len(slots)} slots")
    held, stored = new[0].offset, batch[0].keys.shape[0]
    size = max(stored, max(slots) + 1, rows)
    if held > batch[0].offset or size > stored:
        batch = _rebuilt(batch, free, width=held, rows=size, room=room)
    index = mx.array(list(slots), dtype=mx.int32)
    source = None if taken == list(range(new_rows)) else mx.array(taken, dtype=mx.int32)
    for layer, add in zip(batch, new):
        width = layer.offset
        keys, values = add.keys[:, :, :held], add.values[:, :, :held]
        if source is not None:
            keys, values = keys[source], values[source]
        layer.keys[index, :, width - held : width] = keys  # a scatter into the storage: in place
        layer.values[index, :, width - held : width] = values
        padding, added = padding_of(layer), padding_of(add)
        for slot, r in zip(slots, taken):
            padding[slot] = width - held + added[r]
        set_padding(layer, padding)
    return batch


def release(batch: list[KVCache], slots: Sequence[int]) -> None:
    """Free these rows: nothing is copied; they see only their own newest position from now on
    (a row that sees no key at all would compute NaN)."""
    for layer in batch:
        padding = padding_of(layer)
        for slot in slots:
            padding[slot] = layer.offset
        set_padding(layer, padding)


def has_room(batch: list[KVCache], n: int) -> bool:
    """Whether the storage holds n more positions."""
    return batch[0].offset + n <= batch[0].keys.shape[2]


def ensure_room(batch: list[KVCache], n: int, free: Sequence[int] = (), room: int = SPARE) -> list[KVCache]:
    """Room for n more positions: when the storage is full, it is rebuilt without the columns no
    live row needs, with `room` (at least n) free positions."""
    if has_room(batch, n):
        return batch
    return _rebuilt(batch, free, width=0, rows=batch[0].keys.shape[0], room=max(room, n))


def _rebuilt(batch: list[KVCache], free: Sequence[int], width: int, rows: int, room: int) -> list[KVCache]:
    """Every layer's storage copied once: `rows` rows, the leading columns no live row (not in
    `free`) needs dropped, at least `width` positions wide (rows moved right, gaining padding),
    and `room` free positions after them. Free and added rows see nothing (see `release`)."""
    free = set(free)
    out = []
    for layer in batch:
        offset, stored = layer.offset, layer.keys.shape[0]
        padding = padding_of(layer)
        drop = min((p for i, p in enumerate(padding) if i not in free), default=offset)
        new_width = max(offset - drop, width)
        shift = new_width - (offset - drop)
        pad = [(0, rows - stored), (0, 0), (shift, room), (0, 0)]
        cache = KVCache()
        cache.keys = mx.pad(layer.keys[:, :, drop:offset], pad)
        cache.values = mx.pad(layer.values[:, :, drop:offset], pad)
        cache.offset = new_width
        set_padding(cache, [new_width if i in free else p - drop + shift for i, p in enumerate(padding)] + [new_width] * (rows - stored))
        out.append(cache)
    # queued now, layer by layer: the old storage is freed as each copy completes
    mx.async_eval([c.keys for c in out] + [c.values for c in out])
    return out


def drop_newest(cache: list[KVCache], counts: Sequence[int]) -> None:
    """Row r forgets its newest counts[r] positions. What all rows drop is trimmed; a row that
    drops more has its positions rolled right, so the dropped ones become left padding."""
    common = min(counts)
    if common:
        for layer in cache:
            layer.trim(common)
            padding = padding_of(layer)
            if any(p > layer.offset for p in padding):  # free rows (see `release`): kept seeing their own position
                set_padding(layer, [min(p, layer.offset) for p in padding])
    extra = [c - common for c in counts]
    if not any(extra):
        return
    rows = len(counts)
    for layer in cache:
        width = layer.offset
        room = layer.keys.shape[2] - width
        position = mx.arange(width)[None, :]  # (1, width)
        shift = mx.array(extra, dtype=mx.int32)[:, None]  # (rows, 1)
        source = mx.maximum(position - shift, 0)  # a rolled row reads `shift` positions earlier
        index = source[:, None, :, None]  # (rows, 1, width, 1)
        heads, dk, dv = layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]
        layer.keys = mx.take_along_axis(layer.keys[:, :, :width], mx.broadcast_to(index, (rows, heads, width, dk)), axis=2)
        layer.values = mx.take_along_axis(layer.values[:, :, :width], mx.broadcast_to(index, (rows, heads, width, dv)), axis=2)
        if room:
            layer.keys, layer.values = mx.pad(layer.keys, [(0, 0), (0, 0), (0, room), (0, 0)]), mx.pad(layer.values, [(0, 0), (0, 0), (0, room), (0, 0)])
        set_padding(layer, [min(p + e, width) for p, e in zip(padding_of(layer), extra)])
    mx.eval([c.keys for c in cache] + [c.values for c in cache])


def row_state(cache: list[KVCache], row: int) -> list[tuple[mx.array, mx.array]]:
    """A copy of one row's real positions, per layer: ((1, heads, n, dk), (1, heads, n, dv))."""
    state = []
    for layer in cache:
        start = padding_of(layer)[row]
        keys = mx.contiguous(layer.keys[row : row + 1, :, start : layer.offset])
        values = mx.contiguous(layer.values[row : row + 1, :, start : layer.offset])
        state.append((keys, values))
    mx.eval(state)
    return state


def from_state(state: list[tuple[mx.array, mx.array]], length: int) -> list[KVCache]:
    """A one-row cache holding the first `length` positions of a saved state."""
    caches = []
    for keys, values in state:
        cache = KVCache()
        cache.keys, cache.values, cache.offset = keys[:, :, :length], values[:, :, :length], length
        caches.append(cache)
    return caches


def state_nbytes(state: list[tuple[mx.array, mx.array]]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in state)


def _repeated(rows: int, copies: int | Sequence[int]) -> list[int]:
    """Each of `rows` rows repeated `copies` (or copies[r]) times, in order."""
    counts = [copies] * rows if isinstance(copies, int) else list(copies)
    return [r for r in range(rows) for _ in range(counts[r])]


def _take_rows(cache: KVCache, rows: list[int]) -> KVCache:
    out = KVCache()
    index = mx.array(rows, dtype=mx.int32)
    out.keys, out.values, out.offset = cache.keys[index], cache.values[index], cache.offset
    if cache.left_padding is not None:
        padding = padding_of(cache)
        out.set_left_padding([padding[r] for r in rows])
    return out


def _with_room(cache: KVCache, room: int) -> KVCache:
    extra = [(0, 0), (0, 0), (0, room), (0, 0)]
    cache.keys, cache.values = mx.pad(cache.keys, extra), mx.pad(cache.values, extra)
    return cache


def _trimmed(cache: KVCache) -> KVCache:
    out = KVCache()
    out.keys, out.values = cache.keys[:, :, : cache.offset], cache.values[:, :, : cache.offset]
    out.offset = cache.offset
    if cache.left_padding is not None:
        out.set_left_padding(padding_of(cache))
    return out
