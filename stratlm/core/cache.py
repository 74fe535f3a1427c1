"""The per-layer key/value cache (mlx-lm's protocol: update_and_fetch, offset, trim).

Storage grows in blocks of `step` positions, written in place, so decoding one token
does not re-concatenate the whole cache. Rows of a batch may be left-padded: the cache
knows each row's padding, so it gives every row its own RoPE offset and masks the
padding keys; finished rows can be dropped with `filter`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import mlx.core as mx

from .errors import ConfigError


@lru_cache(maxsize=64)
def _no_padding(rows: int) -> mx.array:
    """Zeros for n rows, made once (arrays are immutable, and one made per step costs a graph node)."""
    zeros = mx.zeros((rows,), dtype=mx.int32)
    mx.eval(zeros)
    return zeros


class KVCache:
    # storage holds whole blocks of `step` positions and grows by at least a quarter: at most
    # 25% + 63 positions unused (256-position blocks left a 64-row batch 1.4 GB of unused cache
    # at 320 positions), and on long runs few copies
    step = 64

    def __init__(self, left_padding: Sequence[int] | None = None):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.left_padding = None
        if left_padding is not None:
            self.set_left_padding(left_padding)

    # Each row's left padding lives on the device (attention reads it) and, when known, on the
    # host too: batch bookkeeping (filter, join) then needs no read from the device, which would
    # wait for the step in flight.
    @property
    def left_padding(self) -> mx.array | None:
        return self._left_padding

    @left_padding.setter
    def left_padding(self, value: mx.array | None) -> None:
        self._left_padding, self._padding_host = value, None

    def set_left_padding(self, padding: Sequence[int]) -> None:
        padding = [int(p) for p in padding]
        self._left_padding = mx.array(padding, dtype=mx.int32) if any(padding) else None
        self._padding_host = padding

    def padding_list(self, rows: int = 0) -> list[int]:
        """Each row's left padding on the host (read from the device once if unknown); `rows` zeros when none is padded."""
        if self._left_padding is None:
            return [0] * rows
        if self._padding_host is None:
            self._padding_host = [int(p) for p in self._left_padding.tolist()]
        return self._padding_host

    # -- the protocol ----------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, heads, L, dim) keys/values; return everything cached so far."""
        start = self.offset
        self.make_room(keys, values)
        # (B, heads, positions, dim): indexing without an Ellipsis costs the host ~2 us less a call
        self.keys[:, :, start : self.offset] = keys
        self.values[:, :, start : self.offset] = values
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def make_room(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Room for these (B, heads, L, dim) keys/values, the offset advanced past them, but not
        written: the whole storage (B, heads, capacity, dim), for an op that writes the new
        positions itself (fused.attention_cached, whose returned storage then replaces `keys`
        and `values`)."""
        n = keys.shape[2]
        have = 0 if self.keys is None else self.keys.shape[2]
        if self.offset + n > have:
            self._grow(keys, values, max(self.offset + n, have + have // 4))
        self.offset += n
        return self.keys, self.values

    def trim(self, n: int) -> int:
        """Forget the last n positions (rejected draft tokens); returns how many were trimmed."""
        n = min(self.offset, max(0, n))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    #: The most positions `trim` can take back after a forward (None: any number)
    max_trim: int | None = None

    # -- what attention needs ----------------------------------------------------------------
    @property
    def rope_offset(self) -> int | mx.array:
        """Position of the next token: per row when rows are left-padded."""
        if self.left_padding is None:
            return self.offset
        return self.offset - self.left_padding

    def row_starts(self, rows: int) -> mx.array:
        """Each row's first real storage position (its left padding), int32 (rows,): for an op
        that reads the storage itself."""
        return self.left_padding if self.left_padding is not None else _no_padding(rows)

    def make_mask(self, n_new: int) -> mx.array | str | None:
        """Attention mask for n_new queries against offset + n_new keys (before the update)."""
        if self.left_padding is None:
            return "causal" if n_new > 1 else None
        total = self.offset + n_new
        key_pos = mx.arange(total)
        query_pos = mx.arange(self.offset, total)
        causal = query_pos[:, None] >= key_pos[None, :]
        real = key_pos[None, :] >= self.left_padding[:, None]  # (B, total)
        # a padding query sees its own key: a query that sees nothing gives NaN, which the next
        # layer's keys and values carry to the real positions (masked weights times NaN is NaN)
        itself = query_pos[:, None] == key_pos[None, :]
        return causal[None, None] & (real[:, None, None, :] | itself[None, None])

    # -- batch bookkeeping -------------------------------------------------------------------
    def filter(self, rows: Sequence[int] | mx.array) -> None:
        """Keep only these batch rows; drop padding columns no remaining row needs."""
        kept = [int(r) for r in (rows.tolist() if isinstance(rows, mx.array) else rows)]
        index = rows if isinstance(rows, mx.array) else mx.array(kept, dtype=mx.int32)
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]
        if self.left_padding is None:
            return
        before = self.padding_list()
        padding = [before[r] for r in kept]
        shift = self._drop_padding_columns(padding)
        self.set_left_padding([p - shift for p in padding])

    def _drop_padding_columns(self, padding: list[int]) -> int:
        """Drop the leading columns that are padding in every row; how many were dropped."""
        shift = min(padding, default=0)
        if not shift or self.keys is None:
            return 0
        self.keys = self.keys[..., shift:, :]
        self.values = self.values[..., shift:, :]
        self.offset -= shift
        return shift

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return 2 * self.keys[..., : self.offset, :].nbytes

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        capacity = ((needed + self.step - 1) // self.step) * self.step
        if self.keys is None:
            self.keys = mx.zeros((B, H, capacity, Dk), keys.dtype)
            self.values = mx.zeros((B, H, capacity, Dv), values.dtype)
        else:
            # pad, not concatenate with zeros: no separate block of zeros while the copy is made
            # (measured: growth peak 1.5x instead of 2x the new block)
            extra = [(0, 0), (0, 0), (0, capacity - self.keys.shape[2]), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, extra), mx.pad(self.values, extra)
            # queue the copy now, one layer at a time: left in the step's graph, the old buffers of
            # every layer in one GPU command batch stay alive until it completes (once per
            # growth). Queued, not waited for: a wait here stalls the host on the step already in
            # flight, layer after layer (on CUDA that was most of the scheduler's host time).
            mx.async_eval(self.keys, self.values)


class StaticKVCache(KVCache):
    """A cache whose shapes stay fixed while decoding, so one traced step (mx.compile) serves
    every token: storage is preallocated for `capacity` positions, the write position is an
    array (`position`), and inside the trace (`tracing`, set by the compiled step) attention runs
    over the whole buffer with the unwritten tail masked. Outside it (the prompt's pass) it is a
    KVCache: slices and the causal mask, not a masked attention over the whole buffer (on an
    H100 that kept ~10 MB more alive at the peak). `offset` still counts positions on the host;
    `trim` works as for KVCache. No left padding.
    """

    growth = 256  # positions added when full (not KVCache's quarter): each new shape is a new trace

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = ((max(1, capacity) + self.step - 1) // self.step) * self.step
        self.position = mx.array(0, dtype=mx.int32)
        self.tracing = False

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if not self.tracing:
            return super().update_and_fetch(keys, values)
        at = self.position.reshape(1)
        self.make_room(keys, values)
        self.keys = mx.slice_update(self.keys, keys, at, axes=(2,))
        self.values = mx.slice_update(self.values, values, at, axes=(2,))
        return self.keys, self.values  # the whole buffer, its unwritten tail masked (make_mask)

    def make_room(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if self.keys is None:
            self._grow(keys, values, self._size_for(n))
        self.reserve(n)
        self.position = self.position + n
        self.offset += n
        return self.keys, self.values

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more positions now: a compiled step cannot grow its buffers."""
        size = self._size_for(n_new)
        if self.keys is not None and size > self.keys.shape[2]:
            self.capacity = size
            self._grow(self.keys, self.values, size)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self.position = mx.array(self.offset, dtype=mx.int32)
        return n

    @property
    def rope_offset(self) -> int | mx.array:
        return self.position if self.tracing else self.offset

    def make_mask(self, n_new: int) -> mx.array | str | None:
        if not self.tracing:
            return super().make_mask(n_new)
        query_pos = self.position + mx.arange(n_new)
        return mx.arange(self._size_for(n_new))[None, :] <= query_pos[:, None]

    def _size_for(self, n_new: int) -> int:
        """Buffer length once n_new more positions are written: the capacity at first, then
        `growth` more at a time."""
        have = 0 if self.keys is None else self.keys.shape[2]
        needed = self.offset + n_new
        if needed <= have:
            return have
        if have:
            needed = max(needed, have + self.growth)
        return max(self.capacity, ((needed + self.step - 1) // self.step) * self.step)


class RotatingKVCache(KVCache):
    """The cache of a sliding-window attention layer (Mistral, Gemma 3's local layers, Phi-3):
    a query at position q sees the keys at q - window + 1 .. q, so only the last positions are
    kept, in a ring of `size` slots (position p in slot p % size), written in place when decoding.

    The ring holds `window - 1 + trim_room` positions: the window for the next query, plus
    `trim_room` positions a speculative step may take back (`trim`); forgetting more than that
    once the ring has wrapped would need positions already overwritten, and is refused.
    Keys come back in slot order, not time order: attention does not care, and the mask
    (`make_mask`) is built from each slot's position. Left padding works as for KVCache (the
    padded positions are masked); positions are never shifted, so `filter` keeps them.
    """

    def __init__(self, window: int, left_padding: Sequence[int] | None = None, trim_room: int = 64):
        super().__init__(left_padding)
        if window < 1:
            raise ConfigError(f"a sliding window holds at least 1 position, got {window}")
        self.window = int(window)
        self.trim_room = self.max_trim = max(1, int(trim_room))
        self.size = self.window - 1 + self.trim_room
        self.written = 0  # the end of the positions ever written: slots hold positions written - size .. written - 1

    # -- the protocol ----------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if n == 1:  # decoding: write the slot in place, attend over the ring
            self._write(keys, values)
            held = min(self.offset, self.size)
            return self.keys[:, :, :held], self.values[:, :, :held]
        # several positions (a prompt chunk, a speculative verify): the ring as it was, then the
        # new positions; each new query needs up to window - 1 earlier ones, which the ring holds
        held = min(self.offset, self.size)
        if held:
            all_keys = mx.concatenate([self.keys[:, :, :held], keys], axis=2)
            all_values = mx.concatenate([self.values[:, :, :held], values], axis=2)
        else:
            all_keys, all_values = keys, values
        self._write(keys, values)
        return all_keys, all_values

    def make_room(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        raise NotImplementedError("RotatingKVCache has no contiguous storage to write into; use update_and_fetch")

    def trim(self, n: int) -> int:
        n = min(self.offset, max(0, n))
        # the next query needs the window - 1 positions before the new offset; once the ring has
        # wrapped, those older than `written - size` were overwritten
        if self.written > self.size and self.written - (self.offset - n) > self.trim_room:
            raise ConfigError(
                f"a sliding-window cache (window {self.window}) can take back at most {self.trim_room} positions "
                f"(counting earlier trims not yet written over) once it has wrapped, not {self.written - (self.offset - n)}: "
                f"draft at most {self.trim_room} tokens a step"
            )
        self.offset -= n
        return n

    # -- what attention needs ----------------------------------------------------------------
    def slot_positions(self, last: int, held: int) -> mx.array:
        """The position each of the first `held` slots holds when `last` is the newest written."""
        slots = mx.arange(held)
        return last - (last - slots) % self.size

    def make_mask(self, n_new: int) -> mx.array | str | None:
        """The mask for n_new queries at offset.. against the keys update_and_fetch returns:
        one new position: the ring after the write; several: the ring before it, then them."""
        offset = self.offset
        if n_new == 1:
            if self.left_padding is None and offset < self.window:
                return None  # every slot written so far is inside the window
            held = min(offset + 1, self.size)
            key_pos = self.slot_positions(offset, held)
        else:
            if self.left_padding is None and offset == 0 and n_new <= self.window:
                return "causal"
            held = min(offset, self.size)
            new = mx.arange(offset, offset + n_new)
            key_pos = mx.concatenate([self.slot_positions(offset - 1, held), new]) if held else new
        query_pos = mx.arange(offset, offset + n_new)
        mask = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - self.window)
        mask = mask[None, None]
        if self.left_padding is not None:
            real = key_pos[None, None, None, :] >= self.left_padding[:, None, None, None]
            mask = mask & (real | (key_pos[None, :] == query_pos[:, None])[None, None])  # see KVCache.make_mask
        return mask

    # -- batch bookkeeping -------------------------------------------------------------------
    def _drop_padding_columns(self, padding: list[int]) -> int:
        """Nothing: filter keeps positions as they are (the ring is not shifted)."""
        return 0

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        held = min(self.offset, self.size)
        return 2 * self.keys[:, :, :held].nbytes

    def _write(self, keys: mx.array, values: mx.array) -> None:
        """Store the new positions (the last `size` of them) in their slots; advance the offset."""
        n = keys.shape[2]
        keep = min(n, self.size)
        first = self.offset + n - keep  # position of the first one kept
        self._reserve(min(self.offset + n, self.size), keys, values)
        start = first % self.size
        head = min(keep, self.size - start)
        self.keys[:, :, start : start + head] = keys[:, :, n - keep : n - keep + head]
        self.values[:, :, start : start + head] = values[:, :, n - keep : n - keep + head]
        if head < keep:  # wrapped past the last slot
            self.keys[:, :, : keep - head] = keys[:, :, n - keep + head :]
            self.values[:, :, : keep - head] = values[:, :, n - keep + head :]
        self.offset += n
        self.written = max(self.written, self.offset)

    def _reserve(self, length: int, keys: mx.array, values: mx.array) -> None:
        """Storage for at least `length` slots: grown in blocks like KVCache, never past `size`."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if length <= have:
            return
        target = min(self.size, max(length, have + have // 4, ((length + self.step - 1) // self.step) * self.step))
        B, H, _, Dk = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, H, target, Dk), keys.dtype)
            self.values = mx.zeros((B, H, target, values.shape[3]), values.dtype)
        else:
            extra = [(0, 0), (0, 0), (0, target - have), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, extra), mx.pad(self.values, extra)
            mx.eval(self.keys, self.values)
