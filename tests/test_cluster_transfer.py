"""Blocks across the cluster, on a real multi-node Ray cluster (``ray.cluster_utils.Cluster`` on
loopback, each node with its own object store): a prefix computed on one node serves a worker on
the other through the object store, with transformers' greedy tokens; stale plans, corrupted
payloads and a vanished source cost a recompute and nothing else; ``warm`` replicates by pulling;
and cluster-aware eviction keeps last copies where LRU drops them. The deployment has an
integrity key (``integrity_key_env``, set before the nodes start, so every worker reads it): every
pull here moves a sealed batch, and a peer's unsealed one is refused.

The head node has no CPUs, so the two workers live on the two other nodes, one each; the node
removal test runs last, since it takes one of them away.
"""

from __future__ import annotations

import os
import time

import msgpack
import numpy as np
import pytest
import ray
from ray.util.state import list_actors

import rayk
from rayk.cache.block_codec import MAGIC, PREFIX_BYTES
from rayk.cluster.routing import FetchPlan
from rayk.cluster.worker import worker_actor_name
from tests.conftest import BLOCK_SIZE, hf_greedy, local_ray_nodes, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
NAMESPACE = "rayk-test-transfer"
PREFIX_BLOCKS = 5
PROMPT = random_prompts([PREFIX_BLOCKS * BLOCK_SIZE + 5], seed=700)[0]
KEY_ENV = "RAYK_TEST_TRANSFER_INTEGRITY_KEY"


@pytest.fixture(scope="module")
def ray_nodes():
    os.environ[KEY_ENV] = "the transfer tests' deployment secret"  # inherited by every node's processes
    try:
        with local_ray_nodes(NAMESPACE, 0, 2, 2) as nodes:
            yield nodes
    finally:
        del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def cluster(ray_nodes, tiny_llama_dir):
    options = dict(block_size=BLOCK_SIZE, num_device_blocks=16, liveness_timeout_s=2.0, pull_timeout_s=5.0, integrity_key_env=KEY_ENV)
    with rayk.Cluster(str(tiny_llama_dir), num_workers=2, namespace=NAMESPACE, **options) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return hf_greedy(tiny_llama_dir, [PROMPT], GREEDY.max_tokens)[0]


@pytest.fixture()
def fresh(cluster):
    cluster.reset_prefix_cache()
    assert cluster.stats()["directory"]["blocks"] == 0
    return cluster


def _failed_pulls(cluster, worker: str) -> dict:
    return cluster.stats()["workers"][worker]["transfers"]["failed_pulls"]


def test_the_workers_are_on_different_nodes(cluster):
    stats = cluster.stats()["workers"]
    assert len({w["node_id"] for w in stats.values()}) == 2


def test_a_prefix_computed_on_one_node_serves_the_other_through_the_object_store(fresh, reference):
    computed = fresh.generate(PROMPT, GREEDY, worker="worker-0", pull="never")[0]
    assert computed.token_ids == reference and computed.num_cached_tokens == 0
    fresh._control("flush_events", "worker-0")
    pulled = fresh.generate(PROMPT, GREEDY, worker="worker-1", pull="always")[0]
    assert pulled.token_ids == reference
    assert pulled.cached_tokens_by_tier["remote"] == pulled.num_cached_tokens == PREFIX_BLOCKS * BLOCK_SIZE
    stats = fresh.stats()
    transfers = stats["workers"]["worker-1"]["transfers"]
    assert transfers["pulled_blocks"] == PREFIX_BLOCKS and transfers["pull_tokens_per_s"] > 0 and not transfers["failed_pulls"]
    assert stats["workers"]["worker-0"]["transfers"]["served_blocks"] == PREFIX_BLOCKS
    assert stats["routing"]["pull_plans"] >= 1
    # Published on arrival: the puller now hits its own device.
    again = fresh.generate(PROMPT, GREEDY, worker="worker-1", pull="always")[0]
    assert again.cached_tokens_by_tier["device"] == PREFIX_BLOCKS * BLOCK_SIZE and again.token_ids == reference


def test_pull_never_recomputes_on_the_other_node_and_is_still_right(fresh, reference):
    fresh.generate(PROMPT, GREEDY, worker="worker-0", pull="never")
    fresh._control("flush_events", "worker-0")
    output = fresh.generate(PROMPT, GREEDY, worker="worker-1", pull="never")[0]
    assert output.token_ids == reference and output.num_cached_tokens == 0


def test_warm_replicates_a_prefix_by_pulling_it(fresh, reference):
    outputs = fresh.warm(PROMPT, workers=2)
    assert [o.cached_tokens_by_tier["remote"] for o in outputs] == [0, PREFIX_BLOCKS * BLOCK_SIZE]
    assert {o.worker for o in outputs} == {"worker-0", "worker-1"}
    for worker in ("worker-0", "worker-1"):
        assert fresh.generate(PROMPT, GREEDY, worker=worker, pull="never")[0].cached_tokens_by_tier["device"] == PREFIX_BLOCKS * BLOCK_SIZE
    with pytest.raises(ValueError, match="workers must be between 1 and the 2 live workers"):
        fresh.warm(PROMPT, workers=3)


def _route(cluster, keys, worker: str, pull: str):
    return ray.get(cluster._coordinator.route.remote("r-" + str(time.monotonic_ns()), keys, len(PROMPT), None, worker, pull))


def test_planned_blocks_the_source_evicted_meanwhile_are_recomputed(fresh, reference):
    fresh.generate(PROMPT, GREEDY, worker="worker-0", pull="never")
    fresh._control("flush_events", "worker-0")
    keys = fresh.block_hashes(PROMPT)
    decision = _route(fresh, keys, "worker-1", "always")
    assert decision.plan is not None and decision.plan.source == "worker-0"
    fresh.evict(PROMPT, worker="worker-0")  # after the plan, before the pull
    output = ray.get(fresh._worker("worker-1").generate.remote(PROMPT, GREEDY, None, decision.request_id, decision.plan))
    ray.get(fresh._coordinator.complete.remote([(decision.request_id, output.num_cached_tokens)]))
    assert output.token_ids == reference and output.num_cached_tokens == 0
    assert _failed_pulls(fresh, "worker-1").get("stale", 0) >= 1


@ray.remote(num_cpus=0)
class _CorruptingPeer:
    """A peer that serves real batches from a real worker, with one byte flipped in a payload."""

    def __init__(self, real: str, namespace: str):
        self.real = ray.get_actor(worker_actor_name(real), namespace=namespace)

    async def export_blocks(self, keys):
        buffer = np.array(await self.real.export_blocks.remote(keys))
        buffer[-7] ^= 0xFF  # inside the last block's payload
        return buffer


def test_a_corrupted_payload_is_refused_and_its_block_recomputed(fresh, reference):
    fresh.generate(PROMPT, GREEDY, worker="worker-0", pull="never")
    peer = _CorruptingPeer.options(name=worker_actor_name("corrupting"), namespace=NAMESPACE).remote("worker-0", NAMESPACE)
    try:
        plan = FetchPlan("corrupting", tuple(fresh.block_hashes(PROMPT)))
        output = ray.get(fresh._worker("worker-1").generate.remote(PROMPT, GREEDY, None, "corrupted-pull", plan))
    finally:
        ray.kill(peer)
    assert output.token_ids == reference
    assert output.cached_tokens_by_tier["remote"] == (PREFIX_BLOCKS - 1) * BLOCK_SIZE  # the chain stops at the bad block
    assert _failed_pulls(fresh, "worker-1").get("checksum", 0) >= 1


@ray.remote(num_cpus=0)
class _UnsealingPeer:
    """A peer without the deployment's key: it serves a real worker's sealed batch with its MAC
    taken out, every block and checksum intact."""

    def __init__(self, real: str, namespace: str):
        self.real = ray.get_actor(worker_actor_name(real), namespace=namespace)

    async def export_blocks(self, keys):
        buffer = bytes(np.array(await self.real.export_blocks.remote(keys)))
        length = int.from_bytes(buffer[len(MAGIC) : PREFIX_BYTES], "little")
        header = msgpack.unpackb(buffer[PREFIX_BYTES : PREFIX_BYTES + length])
        del header["mac"]  # a KeyError here (another failure reason) if the worker did not seal it
        packed = msgpack.packb(header, use_bin_type=True)
        return np.frombuffer(MAGIC + len(packed).to_bytes(4, "little") + packed + buffer[PREFIX_BYTES + length :], dtype=np.uint8)


def test_a_peer_batch_not_sealed_with_the_deployments_key_is_refused(fresh, reference):
    fresh.generate(PROMPT, GREEDY, worker="worker-0", pull="never")
    peer = _UnsealingPeer.options(name=worker_actor_name("unsealing"), namespace=NAMESPACE).remote("worker-0", NAMESPACE)
    try:
        plan = FetchPlan("unsealing", tuple(fresh.block_hashes(PROMPT)))
        before = _failed_pulls(fresh, "worker-1").get("bad_batch", 0)
        output = ray.get(fresh._worker("worker-1").generate.remote(PROMPT, GREEDY, None, "unsealed-pull", plan))
    finally:
        ray.kill(peer)
    assert output.token_ids == reference and output.cached_tokens_by_tier["remote"] == 0
    assert _failed_pulls(fresh, "worker-1").get("bad_batch", 0) == before + 1


def _wait_for_replicas(cluster, worker: str, count: int, timeout_s: float = 10.0) -> None:
    """Until the worker has been told of exactly ``count`` replicated blocks (marks of blocks
    an earlier test left are withdrawn first)."""
    deadline = time.monotonic() + timeout_s
    while cluster.stats()["workers"][worker]["replicated_blocks"] != count:
        assert time.monotonic() < deadline, "the coordinator never told the worker about its replicas"
        time.sleep(0.1)


@pytest.mark.parametrize("policy", ["cluster_aware", "lru"])
def test_cluster_aware_eviction_keeps_a_last_copy_where_lru_drops_it(fresh, policy):
    """worker-0 holds prefixes B (older) and A; worker-1 pulls A, so only B is a last copy. A
    request that needs two of worker-0's cached blocks evicts A's under cluster_aware, B's under
    LRU."""
    fresh.set_eviction_policy(policy, worker="worker-0")
    older, newer = random_prompts([3 * BLOCK_SIZE + 2, 3 * BLOCK_SIZE + 2], seed=710 + len(policy))
    fresh.generate(older, GREEDY, worker="worker-0", pull="never")
    fresh.generate(newer, GREEDY, worker="worker-0", pull="never")
    fresh._control("flush_events", "worker-0")
    assert fresh.generate(newer, GREEDY, worker="worker-1", pull="always")[0].cached_tokens_by_tier["remote"] == 3 * BLOCK_SIZE
    fresh._control("flush_events", "worker-1")
    _wait_for_replicas(fresh, "worker-0", 3)
    # 16 device blocks: 6 hold the two prefixes, 10 are free; this request needs 12.
    filler = random_prompts([12 * BLOCK_SIZE - GREEDY.max_tokens], seed=720)[0]
    fresh.generate(filler, GREEDY, worker="worker-0", pull="never")
    kept = {name: fresh.locate(p, worker="worker-0")["device"] for name, p in (("older", older), ("newer", newer))}
    if policy == "cluster_aware":
        assert kept == {"older": 3, "newer": 1}  # the last copy stays whole
    else:
        assert kept == {"older": 1, "newer": 3}  # LRU drops the last copy
    fresh.set_eviction_policy("cluster_aware", worker="worker-0")


def test_the_sources_node_removed_before_the_pull_costs_a_recompute_and_leaks_nothing(ray_nodes, fresh, reference):
    workers = fresh.stats()["workers"]
    [coordinator] = list_actors(filters=[("name", "=", "rayk-coordinator"), ("state", "=", "ALIVE")])
    # The source is the worker whose node the coordinator does not share (a node may host both).
    source = next(w for w in ("worker-1", "worker-0") if workers[w]["node_id"] != coordinator.node_id)
    puller = "worker-0" if source == "worker-1" else "worker-1"
    fresh.generate(PROMPT, GREEDY, worker=source, pull="never")
    fresh._control("flush_events", source)
    [node] = [n for n in ray_nodes.list_all_nodes() if n.node_id == workers[source]["node_id"]]
    ray_nodes.remove_node(node)
    output = fresh.generate(PROMPT, GREEDY, worker=puller, pull="always")[0]
    assert output.token_ids == reference and output.cached_tokens_by_tier["remote"] == 0
    assert sum(_failed_pulls(fresh, puller).values()) >= 1
    deadline = time.monotonic() + 60
    while True:  # the source comes back on the surviving node as a new incarnation
        live = fresh.workers()
        stats = fresh.stats()["workers"]
        if source in stats and stats[source]["epoch"] != workers[source]["epoch"]:
            break
        assert time.monotonic() < deadline, "the removed node's worker never came back"
        time.sleep(0.2)
    for worker in live:
        assert fresh._control("check_invariants", worker) == {"used_blocks": 0, "running": 0, "waiting": 0, "staged_requests": 0}
