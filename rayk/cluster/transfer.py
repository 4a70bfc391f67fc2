"""Pulling blocks from a peer worker, and the rates the router prices pulls with.

Plain Python (the Ray call is passed in as ``fetch``), so every path is tested without Ray.

A pull is one call to the source worker's ``export_blocks``: the source encodes the planned run of
blocks it still holds as one block batch (``rayk.cache.block_codec``; sealed, on a deployment
with an integrity key), Ray puts it in the object store as one object, and the puller's
``await`` fetches it to its own node. The puller checks it off the event loop (header and seal,
every block's checksum and values, and every block's key recomputed from its parent key and
token ids) and hands the verified blocks to the engine with the request. Whatever goes wrong —
the source is gone or its object lost, the call times out, the header is foreign or not sealed
under the key, a block fails its checksum or holds non-finite values, a key is not the one its
tokens hash to, the source no longer holds some planned blocks — the request is served anyway:
the blocks it lacks are recomputed. Each failure is counted by reason.

Rates: ``RateMeter`` keeps an exponentially weighted average of amount per second. A worker
measures its pulls (tokens of KV per second, the whole call included) and its prefill (prompt
tokens per second over steps that prefill at least a block), and reports both with its load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from rayk.cache import block_codec
from rayk.cache.block_codec import BlockBatchError, DecodedBatch
from rayk.cache.paged_kv import KVLayout
from rayk.cluster.routing import FetchPlan
from rayk.hashing import BlockHash, BlockHasher

logger = logging.getLogger(__name__)

# (source worker id, keys) -> the source's block batch
Fetch = Callable[[str, Sequence[BlockHash]], Awaitable[np.ndarray]]


class RateMeter:
    """Amount per second, an exponentially weighted average of the samples (0.0 before any)."""

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.rate = 0.0
        self.num_samples = 0

    def add(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:
            return
        sample = amount / seconds
        self.rate = sample if not self.num_samples else (1 - self.weight) * self.rate + self.weight * sample
        self.num_samples += 1


class PeerPuller:
    """Runs fetch plans for one worker and keeps its transfer statistics."""

    def __init__(self, fetch: Fetch, hasher: BlockHasher, layout: KVLayout, timeout_s: float = 10.0, integrity_key: bytes | None = None):
        self.fetch = fetch
        self.hasher = hasher
        self.fingerprint = hasher.fingerprint
        self.layout = layout
        self.integrity_key = integrity_key
        self.timeout_s = timeout_s
        self.rate = RateMeter()  # tokens of KV per second
        self.num_pulls = 0
        self.pulled_blocks = 0
        self.pulled_bytes = 0
        self.pull_seconds = 0.0  # wall time of the pulls that brought blocks, fetch and checks included
        self.served_blocks = 0
        self.served_bytes = 0
        self.failures: Counter[str] = Counter()

    async def pull(self, plan: FetchPlan) -> DecodedBatch | None:
        """The planned blocks the source sent and that passed their checks (possibly fewer than
        planned, or none: None), for the engine to stage."""
        self.num_pulls += 1
        start = time.perf_counter()
        try:
            buffer = await asyncio.wait_for(self.fetch(plan.source, plan.keys), self.timeout_s)
        except asyncio.TimeoutError:
            self.failures["timeout"] += 1
            return None
        except Exception as error:  # the source died, its node left, its object was lost
            self.failures[type(error).__name__] += 1
            return None
        try:
            decoded = await asyncio.to_thread(block_codec.decode, buffer, self.fingerprint, self.layout, self.integrity_key)
        except BlockBatchError:
            self.failures["bad_batch"] += 1
            return None
        except Exception:  # not even a buffer (a peer of another version?): still only a miss
            logger.exception("a pull from %s returned something that is not a block batch", plan.source)
            self.failures["bad_batch"] += 1
            return None
        if decoded.num_rejected:
            self.failures["checksum"] += 1
        recomputed = decoded.keep([self.hasher.key_of(r.parent, r.tokens) == r.key for r in decoded.records])
        if recomputed is not decoded:
            self.failures["forged_key"] += 1
            decoded = recomputed
        elapsed = time.perf_counter() - start
        if len(decoded.records) + decoded.num_rejected < len(plan.keys):
            self.failures["stale"] += 1  # the source no longer held some planned blocks
        if not decoded.records:
            return None
        self.pulled_blocks += len(decoded.records)
        self.pulled_bytes += len(buffer)
        self.pull_seconds += elapsed
        self.rate.add(len(decoded.records) * self.layout.block_size, elapsed)
        return decoded

    def served(self, num_blocks: int, num_bytes: int) -> None:
        """Counts a batch this worker exported to a peer."""
        self.served_blocks += num_blocks
        self.served_bytes += num_bytes

    def stats(self) -> dict:
        return {
            "pulls": self.num_pulls,
            "pulled_blocks": self.pulled_blocks,
            "pulled_bytes": self.pulled_bytes,
            "pull_seconds": self.pull_seconds,
            "served_blocks": self.served_blocks,
            "served_bytes": self.served_bytes,
            "pull_tokens_per_s": self.rate.rate,
            "pull_bytes_per_s": self.rate.rate * self.layout.bytes_per_token,
            "failed_pulls": dict(self.failures),
        }
