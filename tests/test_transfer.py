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
from rayk.hashing import BlockHasher, token_bytes

LAYOUT = KVLayout(num_layers=1, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32)
FINGERPRINT = b"f" * 32
HASHER = BlockHasher(FINGERPRINT, LAYOUT.block_size)
KEYS = tuple(HASHER.hash_blocks([0] * 4 + [1] * 4 + [2] * 4))  # block i holds token i four times
SECRET = b"a per-deployment secret"


def _records(n: int) -> list[BlockRecord]:
    return [BlockRecord(i, KEYS[i], KEYS[i - 1] if i else HASHER.root(), i, token_bytes([i] * 4)) for i in range(n)]


def _batch(n: int, records: list[BlockRecord] | None = None, integrity_key: bytes | None = None) -> np.ndarray:
    return block_codec.encode(records or _records(n), torch.randn(2, 1, n, 4, 1, 8), FINGERPRINT, LAYOUT, integrity_key=integrity_key)


def _pull(fetch, timeout_s: float = 5.0, integrity_key: bytes | None = None):
    puller = PeerPuller(fetch, HASHER, LAYOUT, timeout_s, integrity_key)
    return puller, asyncio.run(puller.pull(FetchPlan("worker-1", KEYS)))


def test_a_good_pull_returns_every_block_and_measures_the_rate():
    async def fetch(source, keys):
        assert source == "worker-1" and tuple(keys) == KEYS
        return _batch(3)

    puller, decoded = _pull(fetch)
    assert [r.key for r in decoded.records] == list(KEYS)
    assert puller.pulled_blocks == 3 and puller.rate.rate > 0 and not puller.failures


def test_a_block_under_a_key_its_tokens_do_not_hash_to_is_refused():
    """A peer's checksums are its own: a forged block passes them, its key recomputation does not."""
    forged = _records(3)
    forged[1] = BlockRecord(1, KEYS[1], KEYS[0], 1, token_bytes([7] * 4))  # other tokens under block 1's key

    async def fetch(source, keys):
        return _batch(3, forged)

    puller, decoded = _pull(fetch)
    assert [r.key for r in decoded.records] == [KEYS[0], KEYS[2]] and decoded.num_rejected == 1
    assert decoded.blocks.shape[2] == 2 and puller.failures == {"forged_key": 1}


@pytest.mark.parametrize(
    "sealed_with, pulled_with, served",
    [(SECRET, SECRET, True), (None, SECRET, False), (b"another deployment's key", SECRET, False), (SECRET, None, True)],
    ids=["sealed-with-the-key", "not-sealed", "sealed-with-another-key", "sealed-read-without-a-key"],
)
def test_with_an_integrity_key_only_batches_sealed_under_it_are_served(sealed_with, pulled_with, served):
    async def fetch(source, keys):
        return _batch(3, integrity_key=sealed_with)

    puller, decoded = _pull(fetch, integrity_key=pulled_with)
    if served:
        assert [r.key for r in decoded.records] == list(KEYS) and not puller.failures
    else:
        assert decoded is None and puller.failures == {"bad_batch": 1}


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
