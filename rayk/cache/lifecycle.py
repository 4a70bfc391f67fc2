"""Block lifecycle metrics, measured on a sample of blocks so that measuring costs little.

A block is sampled when the first 32 bits of its key, read as a number, fall below
``rate * 2**32``: keys are uniform hashes, so this picks ``rate`` of the blocks, the same ones in
every process, with one comparison. For sampled blocks the sampler records, in seconds:

* lifetime: from being cached to being evicted;
* idle time before eviction: from the last hit (or caching) to eviction;
* reuse gap: between consecutive hits;

and counts blocks evicted before any reuse. Each series keeps its latest ``max_samples`` values.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

from rayk.hashing import BlockHash


class LifecycleSampler:
    def __init__(self, rate: float, max_samples: int = 10_000, clock=time.perf_counter):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"lifecycle sample rate must be in [0, 1], got {rate}")
        self.rate = rate
        self._threshold = int(rate * 2**32)
        self._clock = clock
        self._born: dict[BlockHash, float] = {}
        self._last_access: dict[BlockHash, float] = {}
        self._hits: dict[BlockHash, int] = {}
        self.lifetimes: deque[float] = deque(maxlen=max_samples)
        self.idle_before_eviction: deque[float] = deque(maxlen=max_samples)
        self.reuse_gaps: deque[float] = deque(maxlen=max_samples)
        self.num_sampled = 0
        self.num_evicted = 0
        self.num_evicted_before_reuse = 0

    def sampled(self, key: BlockHash) -> bool:
        return int.from_bytes(key[:4], "little") < self._threshold

    def cached(self, key: BlockHash) -> None:
        if self.sampled(key):
            now = self._clock()
            self._born[key] = self._last_access[key] = now
            self._hits[key] = 0
            self.num_sampled += 1

    def accessed(self, key: BlockHash) -> None:
        if key in self._born:
            now = self._clock()
            if self._hits[key]:
                self.reuse_gaps.append(now - self._last_access[key])
            self._hits[key] += 1
            self._last_access[key] = now

    def evicted(self, key: BlockHash) -> None:
        born = self._born.pop(key, None)
        if born is None:
            return
        now = self._clock()
        self.lifetimes.append(now - born)
        self.idle_before_eviction.append(now - self._last_access.pop(key))
        self.num_evicted += 1
        if self._hits.pop(key) == 0:
            self.num_evicted_before_reuse += 1

    def summary(self) -> dict:
        return {
            "sample_rate": self.rate,
            "sampled_blocks": self.num_sampled,
            "evicted": self.num_evicted,
            "evicted_before_reuse": self.num_evicted_before_reuse,
            "lifetime_s": _describe(self.lifetimes),
            "idle_before_eviction_s": _describe(self.idle_before_eviction),
            "reuse_gap_s": _describe(self.reuse_gaps),
        }


def _describe(values) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": statistics.fmean(ordered),
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max": ordered[-1],
    }
