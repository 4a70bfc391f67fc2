"""Faults on a real multi-node Ray cluster (``ray.cluster_utils.Cluster`` on loopback, one worker
per node): every request still ends, with transformers' greedy tokens, and nothing leaks.

Faults are injected from outside, as they happen in production: a worker or the coordinator
SIGKILLed by pid (``os.kill``, not ``ray.kill``: Ray learns of it the hard way), a worker frozen
with SIGSTOP (a source that stops answering while a pull waits on it), a node removed. Every wait
is bounded: a test fails rather than hangs.

One module-scoped cluster serves every test; the order matters: the cancel storm first, then the
faults from the mildest (a worker restarts) to the node removal, last.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
import ray

import rayk
from rayk.cluster.routing import FetchPlan
from tests.conftest import BLOCK_SIZE, hf_greedy, local_ray_nodes, random_prompts

NAMESPACE = "rayk-test-faults"
NUM_WORKERS = 3
LIVENESS_TIMEOUT_S = 2.0
DROP_BOUND_S = 1.25 * LIVENESS_TIMEOUT_S  # docs/cluster.md: a dead worker is gone within this
RESULT_TIMEOUT_S = 90.0  # no request may take longer, faults included: nothing waits forever
LONG = rayk.SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
STORM = rayk.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # prompts of <= 112 tokens
STORM_PREFILL = rayk.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)  # 400-token prompts
SHORT = rayk.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
IDLE = {"used_blocks": 0, "running": 0, "waiting": 0, "staged_requests": 0}


@pytest.fixture(scope="module")
def ray_nodes():
    # The head has no CPU and each other node one: each worker (one CPU) has a node of its own.
    with local_ray_nodes(NAMESPACE, 0, 1, 1, 1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cluster(ray_nodes, tiny_llama_dir):
    options = {"block_size": BLOCK_SIZE, "max_num_seqs": 4, "max_num_batched_tokens": 64, "liveness_timeout_s": LIVENESS_TIMEOUT_S, "pull_timeout_s": 60.0}
    with rayk.Cluster(str(tiny_llama_dir), num_workers=NUM_WORKERS, namespace=NAMESPACE, **options) as cluster:
        yield cluster


def _wait_for(condition, timeout_s: float, what: str):
    """Polls ``condition`` until it returns something truthy (returned); fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.05)


def _worker_stats(cluster, worker: str) -> dict:
    return ray.get(cluster._worker(worker).stats.remote(), timeout=30)


def _pid(cluster, worker: str) -> int:
    return ray.get(cluster._worker(worker).info.remote(), timeout=30)["pid"]


def _coordinator_process(cluster) -> tuple[int, str]:
    """The coordinator's pid and node id, asked of the coordinator itself (Ray's state API may
    answer for another Ray cluster on this machine)."""
    return ray.get(cluster._coordinator.__ray_call__.remote(lambda _: (os.getpid(), ray.get_runtime_context().get_node_id())), timeout=30)


def _coordinator_epochs(cluster) -> dict[str, int]:
    """The incarnation of each worker the coordinator routes to."""
    return ray.get(cluster._coordinator.stats.remote(), timeout=30)["liveness"]["epochs"]


def _wait_until_idle_and_clean(cluster, workers=None, timeout_s: float = 20.0) -> None:
    """The workers' (every live one's) pools pass their invariants with no block in use and no
    request left."""
    for worker in workers or cluster.workers():
        _wait_for(lambda worker=worker: cluster._control("check_invariants", worker) == IDLE, timeout_s, f"{worker} idle with every block free")


def _generated_tokens(cluster) -> int:
    return cluster.stats()["cluster"]["requests"]["generated_tokens"]


def _registered_with_new_epoch(cluster, worker: str, old_epoch: int) -> int | None:
    epoch = _coordinator_epochs(cluster).get(worker)
    if epoch is None or epoch == old_epoch:
        return None
    stats = cluster.stats()["liveness"]
    return epoch if stats["inventories"] else None


# -- 6. an abort/cancel storm at every stage -------------------------------------------------------


def test_a_cancel_storm_at_every_stage_leaves_every_pool_clean(cluster, tiny_llama_dir):
    """Many requests, cancelled at once while queued (past max_num_seqs), prefilling (long
    prompts in 64-token chunks), decoding (long outputs) and pulling (their source frozen):
    through a submit future, a stream closed early and ``ray.cancel`` of a worker call."""
    workers = cluster.workers()
    source, puller = workers[0], workers[1]
    prefixes = random_prompts([6 * BLOCK_SIZE + 3] * 3, seed=1400)
    for prefix in prefixes:
        cluster.generate(prefix, SHORT, worker=source, pull="never")
    cluster._control("flush_events", source)
    before = _generated_tokens(cluster)

    # Pulling: the source is frozen, so each pull waits on it. One request is routed with a plan,
    # two are sent with one (a burst sharing a prefix would have only its first pull).
    source_pid = _pid(cluster, source)
    os.kill(source_pid, signal.SIGSTOP)
    try:
        pulling = [cluster.submit(prefixes[0], STORM, worker=puller, pull="always")]
        plans = [FetchPlan(source, tuple(cluster.block_hashes(p))) for p in prefixes[1:]]
        pulling_refs = [cluster._worker(puller).generate.remote(p, STORM, None, f"pulling-{i}", plan) for i, (p, plan) in enumerate(zip(prefixes[1:], plans))]
        _wait_for(lambda: _worker_stats(cluster, puller)["transfers"]["pulls"] >= 3, 20, "the pulls started")
        assert pulling[0].cancel()
        for ref in pulling_refs:
            ray.cancel(ref)
    finally:
        os.kill(source_pid, signal.SIGCONT)

    long_prompts = random_prompts([400] * 4, seed=1401)  # prefills for several 64-token steps
    decoding = [cluster.submit(p, STORM, worker=w) for p, w in zip(random_prompts([20] * 6, seed=1402), workers * 2)]
    prefilling = [cluster.submit(p, STORM_PREFILL, worker=w) for p, w in zip(long_prompts, workers)]
    queued = [cluster.submit(p, STORM, worker=workers[2]) for p in random_prompts([30] * 6, seed=1403)]  # past max_num_seqs=4
    streams = [cluster.stream(p, STORM) for p in random_prompts([25] * 3, seed=1404)]
    for stream in streams:
        next(stream)  # decoding now
    direct = [cluster._worker(w).generate.remote(p, STORM, None, f"direct-{i}") for i, (p, w) in enumerate(zip(random_prompts([35] * 3, seed=1405), workers))]
    _wait_for(lambda: cluster.stats()["cluster"]["load"]["waiting"] > 0, 20, "requests queued on a worker")
    for future in decoding + prefilling + queued:
        future.cancel()
    for stream in streams:
        stream.close()
    for ref in direct:
        ray.cancel(ref)

    at_cancel = _generated_tokens(cluster)

    _wait_until_idle_and_clean(cluster)
    # Generating on would have gone on for thousands of tokens; an abort lands within a step or two.
    possible = len(pulling + pulling_refs + decoding + queued + streams + direct) * STORM.max_tokens + len(prefilling) * STORM_PREFILL.max_tokens
    assert _generated_tokens(cluster) - at_cancel < STORM.max_tokens, f"cancelled requests went on generating ({at_cancel - before} of {possible} before the cancel)"
    # The cluster serves on: a pull from the thawed source, with transformers' tokens.
    [output] = cluster.generate(prefixes[0], SHORT, worker=puller, pull="always")
    assert output.token_ids == hf_greedy(tiny_llama_dir, [prefixes[0]], SHORT.max_tokens)[0]


# -- 1. a worker SIGKILLed mid-decode --------------------------------------------------------------


def test_a_worker_sigkilled_mid_decode_has_its_requests_finished_elsewhere_with_the_same_tokens(cluster, tiny_llama_dir):
    prompts = random_prompts([24, 31, 40, 27, 36, 33], seed=1100)
    reference = hf_greedy(tiny_llama_dir, prompts, LONG.max_tokens)
    victim = cluster.workers()[0]
    old_epoch = _coordinator_epochs(cluster)[victim]
    pid = _pid(cluster, victim)
    futures = [cluster.submit(p, LONG, routing="round_robin") for p in prompts]
    _wait_for(lambda: _worker_stats(cluster, victim)["requests"]["generated_tokens"] > 0 and _worker_stats(cluster, victim)["load"]["running"], 30, "the victim decoding")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _wait_for(lambda: _coordinator_epochs(cluster).get(victim) != old_epoch, DROP_BOUND_S + 1.0, "the old incarnation dropped")
    dropped_after = time.monotonic() - killed
    outputs = [f.result(timeout=RESULT_TIMEOUT_S) for f in futures]
    assert [o.token_ids for o in outputs] == reference
    assert dropped_after <= DROP_BOUND_S + 0.5  # a poll's slack
    assert all(o.worker != victim for o in outputs)  # both of its requests were decoding when it died
    _wait_for(lambda: _registered_with_new_epoch(cluster, victim, old_epoch), 60, "the victim restarted")


# -- 2. a worker restarts: a new epoch, nothing of the old one used --------------------------------


def test_a_restarted_worker_has_a_larger_epoch_and_its_old_entries_are_never_routed_to(cluster, tiny_llama_dir):
    victim = cluster.workers()[1]
    prompt = random_prompts([5 * BLOCK_SIZE + 2], seed=1200)[0]
    reference = hf_greedy(tiny_llama_dir, [prompt], SHORT.max_tokens)[0]
    first = cluster.generate(prompt, SHORT, worker=victim, pull="never")[0]
    cluster._control("flush_events", victim)
    old_epoch = _worker_stats(cluster, victim)["epoch"]
    assert first.token_ids == reference and cluster.stats()["directory"]["workers"][victim] >= 5

    os.kill(_pid(cluster, victim), signal.SIGKILL)  # idle: only the coordinator's liveness notices
    killed = time.monotonic()
    _wait_for(lambda: _coordinator_epochs(cluster).get(victim) != old_epoch, DROP_BOUND_S + 1.0, "the old incarnation dropped")
    assert time.monotonic() - killed <= DROP_BOUND_S + 0.5
    new_epoch = _wait_for(lambda: _registered_with_new_epoch(cluster, victim, old_epoch), 60, "the victim restarted")
    assert new_epoch > old_epoch and _worker_stats(cluster, victim)["epoch"] == new_epoch

    keys = cluster.block_hashes(prompt)
    for pull in ("always", "auto"):
        decision = ray.get(cluster._coordinator.route.remote(f"restart-{pull}", keys, len(prompt), None, None, pull), timeout=30)
        ray.get(cluster._coordinator.complete.remote([(decision.request_id, None)]), timeout=30)
        assert decision.predicted_hit_tokens == 0 and decision.plan is None, decision
    again = cluster.generate(prompt, SHORT, worker=victim, pull="always")[0]
    assert again.token_ids == reference and again.num_cached_tokens == 0


# -- 4. the coordinator SIGKILLed ------------------------------------------------------------------


def test_requests_sent_while_the_coordinator_is_down_are_served_and_it_rebuilds(cluster, tiny_llama_dir):
    prompts = random_prompts([3 * BLOCK_SIZE + 1, 20, 45, 33], seed=1300)
    reference = hf_greedy(tiny_llama_dir, prompts, SHORT.max_tokens)
    cluster.generate(prompts[0], SHORT)
    workers = cluster.workers()
    pid, _ = _coordinator_process(cluster)
    os.kill(pid, signal.SIGKILL)
    pool = concurrent.futures.ThreadPoolExecutor(4)
    during = [pool.submit(cluster.generate, p, SHORT) for p in prompts]
    during.append(pool.submit(cluster.generate, prompts[1], SHORT, worker=workers[-1]))
    outputs = [f.result(timeout=RESULT_TIMEOUT_S)[0] for f in during]
    pool.shutdown()
    assert [o.token_ids for o in outputs] == reference + [reference[1]]
    assert outputs[-1].worker == workers[-1]
    stats = _wait_for(
        lambda: (s := cluster.stats())["liveness"]["workers"] == workers and s["liveness"]["inventories"] >= NUM_WORKERS and s["directory"]["blocks"] and s,
        30,
        "the coordinator rebuilt from the inventories",
    )
    assert stats["directory"]["blocks"] >= 3 and _coordinator_process(cluster)[0] != pid  # a new process
    again = cluster.generate(prompts[0], SHORT)[0]
    assert again.num_cached_tokens == 3 * BLOCK_SIZE and again.token_ids == reference[0]


# -- 3. a node removed while a pull from it is in flight -------------------------------------------


def test_a_node_removed_during_a_pull_costs_a_recompute_and_leaks_nothing(ray_nodes, cluster, tiny_llama_dir):
    """Last: it takes a node away (a spare joins first, for the source's next incarnation)."""
    ray_nodes.add_node(num_cpus=1)
    prompt = random_prompts([6 * BLOCK_SIZE + 5], seed=1500)[0]
    reference = hf_greedy(tiny_llama_dir, [prompt], SHORT.max_tokens)[0]
    stats = cluster.stats()["workers"]
    _, coordinator_node = _coordinator_process(cluster)
    source = next(w for w in sorted(stats) if stats[w]["node_id"] != coordinator_node)
    puller = next(w for w in sorted(stats) if w != source)
    cluster.generate(prompt, SHORT, worker=source, pull="never")
    cluster._control("flush_events", source)
    source_pid = _pid(cluster, source)
    before = _worker_stats(cluster, puller)["transfers"]
    os.kill(source_pid, signal.SIGSTOP)  # the pull's call waits on the source
    try:
        future = cluster.submit(prompt, SHORT, worker=puller, pull="always")
        _wait_for(lambda: _worker_stats(cluster, puller)["transfers"]["pulls"] > before["pulls"], 20, "the pull started")
        [node] = [n for n in ray_nodes.list_all_nodes() if n.node_id == stats[source]["node_id"]]
        ray_nodes.remove_node(node)
        output = future.result(timeout=30)
    finally:
        try:
            os.kill(source_pid, signal.SIGKILL)  # frozen, it cannot notice that its node is gone
        except ProcessLookupError:
            pass
    assert output.token_ids == reference and output.cached_tokens_by_tier["remote"] == 0
    failed = _worker_stats(cluster, puller)["transfers"]["failed_pulls"]
    assert sum(failed.values()) > sum(before["failed_pulls"].values()) and "timeout" not in failed
    _wait_until_idle_and_clean(cluster, [w for w in stats if w != source])  # the survivors
