"""KVCache: block growth, trim, per-row padding (masks, RoPE offsets) and filter; a batch's rows
as slots (batch_cache.place, release, ensure_room)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx

from stratlm.core.cache import KVCache, StaticKVCache
from stratlm.decoding import batch_cache
from stratlm.testing import tiny_model


def kv(length: int, start: int = 0, batch: int = 1) -> tuple[mx.array, mx.array]:
    """Keys/values (B, 2 heads, length, 4) whose entries encode their position."""
    pos = mx.arange(start, start + length, dtype=mx.float32)[None, None, :, None]
    keys = mx.broadcast_to(pos, (batch, 2, length, 4))
    return keys, -keys


def test_grows_in_blocks_and_returns_everything_so_far():
    cache = KVCache()
    keys, values = cache.update_and_fetch(*kv(5))
    assert cache.offset == 5 and cache.keys.shape[2] == KVCache.step
    for i in range(5, KVCache.step):
        keys, values = cache.update_and_fetch(*kv(1, i))
    assert cache.keys.shape[2] == KVCache.step  # one token at a time fills the block in place
    keys, values = cache.update_and_fetch(*kv(3, KVCache.step))
    assert cache.keys.shape[2] == 2 * KVCache.step and cache.offset == KVCache.step + 3
    expected = np.arange(KVCache.step + 3, dtype=np.float32)
    assert (np.array(keys)[0, 1, :, 2] == expected).all() and (np.array(values)[0, 0, :, 0] == -expected).all()
    assert cache.nbytes == 2 * keys.nbytes


def test_a_long_prefill_allocates_enough_blocks():
    cache = KVCache()
    keys, _ = cache.update_and_fetch(*kv(600))
    assert cache.keys.shape[2] == 640 and keys.shape[2] == 600  # whole blocks of 64 positions
    cache.update_and_fetch(*kv(41, 600))
    assert cache.keys.shape[2] == 832  # then a quarter more at least (800), in whole blocks


def test_trim_forgets_the_last_positions_and_they_are_overwritten():
    cache = KVCache()
    cache.update_and_fetch(*kv(10))
    assert cache.trim(4) == 4 and cache.offset == 6
    keys, _ = cache.update_and_fetch(*kv(2, 100))
    assert np.array(keys)[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 100, 101]
    assert cache.trim(50) == 8 and cache.offset == 0  # never below zero
    assert cache.trim(-3) == 0
    assert cache.is_trimmable()


def test_masks_and_rope_offsets_follow_each_rows_padding():
    cache = KVCache(left_padding=[2, 0])
    assert cache.make_mask(3).shape == (2, 1, 3, 3)
    mask = np.array(cache.make_mask(3))[:, 0]
    # row 0's first real token is position 2; a padding query sees only itself (a query that sees nothing gives NaN)
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    cache.update_and_fetch(*kv(3, batch=2))
    assert np.array(cache.rope_offset).tolist() == [1, 3]
    assert np.array(cache.make_mask(1))[:, 0, 0].tolist() == [[False, False, True, True], [True, True, True, True]]
    plain = KVCache(left_padding=[0, 0])  # no padding at all: the cheap unpadded path
    assert plain.left_padding is None and plain.make_mask(1) is None and plain.make_mask(4) == "causal"


def test_filter_drops_rows_and_the_padding_no_row_needs():
    cache = KVCache(left_padding=[3, 1, 0])
    cache.update_and_fetch(*kv(5, batch=3))
    cache.filter([0, 1])
    assert cache.keys.shape[0] == 2
    assert cache.offset == 4 and np.array(cache.left_padding).tolist() == [2, 0]  # one shared padding column dropped
    assert np.array(cache.keys)[0, 0, : cache.offset, 0].tolist() == [1, 2, 3, 4]
    cache.filter([0])
    assert cache.left_padding is None and cache.offset == 2  # all of row 0's padding dropped
    assert np.array(cache.keys)[0, 0, : cache.offset, 0].tolist() == [3, 4]


def test_padding_is_known_on_the_host_after_filter_and_from_a_device_array():
    cache = KVCache(left_padding=[3, 1, 0])
    cache.update_and_fetch(*kv(5, batch=3))
    cache.filter(mx.array([2, 0]))  # rows given as a device array, in a new order
    assert cache.padding_list() == np.array(cache.left_padding).tolist() == [0, 3]
    cache.left_padding = mx.array([2, 0], dtype=mx.int32)  # set on the device only: read once when asked
    assert cache.padding_list() == [2, 0]
    cache.filter([0])
    assert cache.left_padding is None and cache.padding_list(1) == [0] and cache.offset == 3


def test_a_joined_batch_keeps_the_room_asked_for():
    from stratlm.decoding import batch_cache

    first, second = KVCache(), KVCache()
    first.update_and_fetch(*kv(5))
    second.update_and_fetch(*kv(3))
    joined = batch_cache.join([first], [second], room=100)[0]
    assert joined.offset == 5 and joined.keys.shape[2] == 5 + 100
    assert batch_cache.padding_of(joined) == [0, 2]  # the shorter row aligned at the right
    assert np.array(joined.keys)[1, 0, 2:5, 0].tolist() == [0, 1, 2]
    joined.update_and_fetch(*kv(100, start=5, batch=2))
    assert joined.keys.shape[2] == 105  # no growth while the rows write their room


def test_filtered_batch_decodes_like_single_rows():
    """Left-padded batch of three; after a few steps the middle row finishes and is filtered out;
    the others keep producing the same logits as when decoded alone."""
    model = tiny_model("llama", seed=1).model
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 256, n).tolist() for n in (3, 7, 5)]
    steps = rng.randint(0, 256, (3, 6)).tolist()
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    cache = model.make_cache(left_padding=padding)
    model(mx.array([[0] * pad + p for pad, p in zip(padding, prompts)]), cache)
    rows = [0, 1, 2]
    batch_logits = {r: [] for r in rows}
    for i in range(6):
        if i == 3:
            rows = [0, 2]
            for c in cache:
                c.filter([0, 2])
        out = np.array(model(mx.array([[steps[r][i]] for r in rows]), cache))[:, 0]
        for j, r in enumerate(rows):
            batch_logits[r].append(out[j])
    assert cache[0].left_padding is None or np.array(cache[0].left_padding).min() == 0
    for r in (0, 1, 2):
        single = model.make_cache()
        model(mx.array([prompts[r]]), single)
        alone = [np.array(model(mx.array([[s]]), single))[0, 0] for s in steps[r][: len(batch_logits[r])]]
        assert np.abs(np.stack(batch_logits[r]) - np.stack(alone)).max() < 1e-4


def test_a_static_cache_stores_the_capacity_asked_for_then_grows_by_a_block():
    cache = StaticKVCache(300)  # rounded to 320, not to KVCache's 256-position blocks
    k = mx.ones((1, 2, 4, 8))
    for _ in range(80):
        storage, _ = cache.make_room(k, k)
        assert storage.shape[2] == 320
    assert cache.offset == 320 and int(cache.position.item()) == 320
    storage, _ = cache.make_room(k, k)
    assert storage.shape[2] == 320 + StaticKVCache.growth  # one new shape (trace) per 256 positions, not per 64
    assert cache.rope_offset == 324  # outside the compiled step the offset is the host's
    cache.tracing = True
    assert int(cache.rope_offset.item()) == 324


@settings(max_examples=20, deadline=None)
@given(plan=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 7), st.integers(0, 3)), min_size=1, max_size=7),
       room=st.integers(1, 4))
def test_rows_in_slots_decode_like_single_rows(plan, room):
    """Rows arrive (prompt length, tokens to decode, steps after the previous one), are written
    into a free slot or a new one, and are released when done; the storage is rebuilt when a row
    is longer than the batch or when it is full (a room of a few positions). Every row's logits
    equal its decode alone, and free slots never spoil a row placed in them later."""
    model = tiny_model("llama", seed=1).model
    rng = np.random.RandomState(len(plan) * 7 + room)
    prompts = [rng.randint(0, 256, n).tolist() for n, _, _ in plan]
    steps = [rng.randint(0, 256, k).tolist() for _, k, _ in plan]
    arrival = np.cumsum([gap for _, _, gap in plan]).tolist()
    logits: list[list[np.ndarray]] = [[] for _ in plan]
    slots: list[int | None] = []  # the request in each row of the batch
    cache, done, t, arrived = None, [0] * len(plan), 0, 0
    while arrived < len(plan) or slots:
        while arrived < len(plan) and arrival[arrived] <= t:
            new = model.make_cache()
            logits[arrived].append(np.array(model(mx.array([prompts[arrived]]), new))[0, -1])
            if cache is None:
                cache, slots = batch_cache.join(None, new, room=room), [arrived]
            else:
                free = [i for i, r in enumerate(slots) if r is None] or [len(slots)]
                slots += [None] * (free[0] + 1 - len(slots))
                cache = batch_cache.place(cache, new, free[:1], free=free, rows=len(slots), room=room)
                slots[free[0]] = arrived
            arrived += 1
        if slots:
            free = [i for i, r in enumerate(slots) if r is None]
            cache = batch_cache.ensure_room(cache, 1, free=free, room=room)
            tokens = [[steps[r][done[r]] if r is not None else 0] for r in slots]
            out = np.array(model(mx.array(tokens), cache))[:, 0]
            assert cache[0].keys.shape[0] == len(slots)
            finished = []
            for i, r in enumerate(slots):
                if r is not None:
                    logits[r].append(out[i])
                    done[r] += 1
                    if done[r] == len(steps[r]):
                        finished.append(i)
                        slots[i] = None
            if all(r is None for r in slots):
                cache, slots = None, []
            elif finished:
                batch_cache.release(cache, finished)
        t += 1
    for r in range(len(plan)):
        single = model.make_cache()
        alone = [np.array(model(mx.array([prompts[r]]), single))[0, -1]]
        alone += [np.array(model(mx.array([[s]]), single))[0, 0] for s in steps[r]]
        assert np.abs(np.stack(logits[r]) - np.stack(alone)).max() < 1e-4, r
