"""The puller's logic without Ray: each way a pull can go wrong is counted by reason and leaves
the request to compute what it lacks; a good pull is measured."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from rayk.cache import block_codec
from rayk.cache.block_pool import BlockRecord
from rayk.cache.paged_kv import KVLayout
from rayk.cluster.routing import FetchPlan
from rayk.cluster.transfer import PeerPuller, RateMeter
from rayk.hashing import token_bytes

LAYOUT = KVLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32)
FINGERPRINT = b"f" * 32
KEYS = tuple(bytes([i + 1]) * 16 for i in range(3))


def _batch(n: int) -> np.ndarray:
    records = [BlockRecord(i, KEYS[i], KEYS[i - 1] if i else bytes(16), i, token_bytes([i] * 4)) for i in range(n)]
    return block_codec.encode(records, torch.randn(2, 1, n, 4, 1, 8), FINGERPRINT, LAYOUT)


def _pull(fetch, timeout_s: float = 5.0):
    puller = PeerPuller(fetch, FINGERPRINT, LAYOUT, timeout_s)
    return puller, asyncio.run(puller.pull(FetchPlan("worker-1", KEYS)))


def test_a_good_pull_returns_every_block_and_measures_the_rate():
    async def fetch(source, keys):
        assert source == "worker-1" and tuple(keys) == KEYS
        return _batch(3)

    puller, decoded = _pull(fetch)
    assert [r.key for r in decoded.records] == list(KEYS)
    assert puller.pulled_blocks == 3 and puller.rate.rate > 0 and not puller.failures


def test_a_source_that_holds_fewer_blocks_than_planned_is_stale():
    async def fetch(source, keys):
        return _batch(2)

    puller, decoded = _pull(fetch)
    assert len(decoded.records) == 2 and puller.failures == {"stale": 1}


@pytest.mark.parametrize(
    "fetch_result, reason",
    [
        (ConnectionError("the source is gone"), "ConnectionError"),
        (b"not a batch", "bad_batch"),
        (None, "timeout"),
    ],
)
def test_a_failed_pull_is_counted_by_reason_and_returns_nothing(fetch_result, reason):
    async def fetch(source, keys):
        if fetch_result is None:
            await asyncio.sleep(10)
        if isinstance(fetch_result, Exception):
            raise fetch_result
        return fetch_result

    puller, decoded = _pull(fetch, timeout_s=0.2)
    assert decoded is None and puller.failures == {reason: 1} and puller.pulled_blocks == 0


def test_a_rate_meter_averages_its_samples():
    meter = RateMeter(weight=0.5)
    assert meter.rate == 0.0
    meter.add(100, 1.0)
    meter.add(300, 1.0)
    meter.add(0, 1.0)  # nothing moved: not a sample
    assert meter.rate == 200.0 and meter.num_samples == 2
