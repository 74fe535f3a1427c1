"""Prompt-prefix caching: the keys and values of token sequences seen before, reused by a new
request whose prompt starts the same way (a shared system prompt, the history of a chat),
so only what is new gets prefilled. Entries are whole sequences; a hit is the longest common
prefix with any entry (any prefix of an entry is usable). Least recently used entries are
evicted to stay within a byte budget (mlx-lm's LRU prompt cache, with longest-prefix reuse).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import mlx.core as mx
import numpy as np

from .batch_cache import state_nbytes

State = list[tuple[mx.array, mx.array]]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, State, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.lookups = 0

    def lookup(self, tokens: Sequence[int]) -> tuple[int, State | None]:
        """(n, state): the longest cached prefix of `tokens`, at most len(tokens) - 1 (the last
        prompt token is always computed: its logits are the first token's distribution)."""
        self.lookups += 1
        query = np.asarray(tokens, dtype=np.int64)
        best, best_key = 0, None
        for key, (array, _, _) in self.entries.items():
            n = common_prefix(array, query)
            if n > best:
                best, best_key = n, key
        best = min(best, len(tokens) - 1)
        if best <= 0 or best_key is None:
            return 0, None
        self.hits += 1
        self.entries.move_to_end(best_key)
        return best, self.entries[best_key][1]

    def insert(self, tokens: Sequence[int], state: State) -> None:
        """Keep `state` (the keys and values of `tokens`); entries it extends are dropped."""
        key = tuple(tokens)
        size = state_nbytes(state)
        if not key or size > self.budget:
            return
        array = np.asarray(key, dtype=np.int64)
        for other in [k for k, (a, _, _) in self.entries.items() if len(a) <= len(array) and common_prefix(a, array) == len(a)]:
            self._remove(other)
        self.entries[key] = (array, state, size)
        self.nbytes += size
        while self.nbytes > self.budget and self.entries:
            self._remove(next(iter(self.entries)))

    def _remove(self, key: tuple[int, ...]) -> None:
        _, _, size = self.entries.pop(key)
        self.nbytes -= size

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
