"""Load: backpressure refuses past ``max_queued_requests`` with ``rayk.Overloaded`` before anything
is queued, on the router and on a real two-node deployment; and a small soak
(``benchmarks/soak.py``: a flood above capacity, cancellations, forced pulls through the object
store, a SIGKILLed worker, bad input) loses nothing, leaks nothing and leaves memory, the object
stores of every node included, at its baseline."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import rayk
from rayk.cluster.coordinator import CoordinatorState
from rayk.cluster.routing import WorkerLoad
from rayk.hashing import BlockHasher
from tests.conftest import BLOCK_SIZE, hf_greedy, local_ray_nodes, random_prompts

NAMESPACE = "rayk-soak-test"
BOUND = 4
ROOT = Path(__file__).resolve().parent.parent


def _state(bound: int | None) -> CoordinatorState:
    state = CoordinatorState(BLOCK_SIZE, max_queued_requests=bound)
    for worker in ("w0", "w1"):
        state.report(worker, 1, [], WorkerLoad(), [])
    return state


def test_the_router_refuses_past_the_bound_and_records_nothing():
    state = _state(BOUND)
    hasher = BlockHasher(b"soak", BLOCK_SIZE)
    prompts = random_prompts([40] * (BOUND + 1), seed=1)
    for i, prompt in enumerate(prompts[:BOUND]):
        state.route(f"r{i}", hasher.hash_blocks(prompt), len(prompt))
    before = state.router.stats()
    with pytest.raises(rayk.Overloaded, match=f"{BOUND} requests are queued or running and max_queued_requests is {BOUND}") as refused:
        state.route("late", hasher.hash_blocks(prompts[-1]), len(prompts[-1]))
    after = state.router.stats()
    assert (refused.value.bound, refused.value.depth) == (BOUND, BOUND)
    with pytest.raises(ValueError, match="worker 'nobody' is not routable"):  # a bad request gets its own error, full or not
        state.route("bad", hasher.hash_blocks(prompts[-1]), len(prompts[-1]), worker="nobody")
    assert after["in_flight"] == after["peak_in_flight"] == BOUND and after["overloaded"] == 1
    assert after["pending_claims"] == before["pending_claims"] and after["decisions"] == before["decisions"]
    state.directory.check_invariants()
    state.complete([("r0", 0)])  # one finishes: there is room again
    assert state.route("late", hasher.hash_blocks(prompts[-1]), len(prompts[-1])).worker_id in ("w0", "w1")
    # Ray carries the error back to the driver by pickling it: it must come back whole.
    copy = pickle.loads(pickle.dumps(refused.value))
    assert (copy.bound, copy.depth, str(copy)) == (BOUND, BOUND, str(refused.value))


def test_without_a_bound_nothing_is_refused_and_a_bad_bound_is_refused():
    state = _state(None)
    hasher = BlockHasher(b"soak", BLOCK_SIZE)
    for i, prompt in enumerate(random_prompts([20] * 50, seed=2)):
        state.route(f"r{i}", hasher.hash_blocks(prompt), len(prompt))
    assert state.router.stats()["in_flight"] == 50
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="max_queued_requests must be an int >= 1"):
            CoordinatorState(BLOCK_SIZE, max_queued_requests=bad)


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir):
    with local_ray_nodes(NAMESPACE, 1, 2), rayk.Cluster(
        str(tiny_llama_dir), num_workers=2, namespace=NAMESPACE, device="cpu", block_size=BLOCK_SIZE, max_model_len=128, max_queued_requests=BOUND
    ) as deployment:
        yield deployment


def test_a_flood_past_the_bound_is_partly_refused_the_rest_completes_and_serving_goes_on(cluster, tiny_llama_dir):
    prompts = random_prompts([60] * 40, seed=3)
    params = rayk.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    futures, refused = {}, []
    for i, prompt in enumerate(prompts):
        try:
            futures[i] = cluster.submit(prompt, params)
        except rayk.Overloaded as error:
            refused.append(error)
    outputs = {i: f.result(timeout=120) for i, f in futures.items()}
    assert refused and futures, (len(refused), len(futures))
    assert all(e.bound == BOUND and e.depth >= BOUND and f"max_queued_requests is {BOUND}" in str(e) for e in refused)
    routing = cluster.stats()["routing"]
    assert routing["peak_in_flight"] <= BOUND and routing["overloaded"] >= len(refused)
    sample = sorted(outputs)[:3]
    assert [outputs[i].token_ids for i in sample] == hf_greedy(tiny_llama_dir, [prompts[i] for i in sample], 24)
    # Afterwards: nothing left queued or in use, and the cluster serves as before.
    assert cluster.stats()["routing"]["in_flight"] == 0
    for state in cluster._control("check_invariants", None).values():
        assert state == {"used_blocks": 0, "running": 0, "waiting": 0, "staged_requests": 0}
    [again] = cluster.generate(prompts[sample[0]], params)
    assert again.token_ids == outputs[sample[0]].token_ids


def test_a_batch_larger_than_the_bound_is_refused_whole_and_a_stream_is_refused_while_full(cluster):
    prompts = random_prompts([30] * (BOUND + 2), seed=4)
    params = rayk.SamplingParams(temperature=0, max_tokens=2)
    finished_before = cluster.stats()["cluster"]["requests"]["finished"]
    with pytest.raises(rayk.Overloaded, match=f"max_queued_requests is {BOUND}"):
        cluster.generate(prompts, params)
    stats = cluster.stats()
    assert stats["routing"]["in_flight"] == 0  # the part that was routed is forgotten: nothing runs
    assert stats["cluster"]["requests"]["finished"] == finished_before
    long = rayk.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    held = [cluster.submit(p, long) for p in prompts[:BOUND]]
    with pytest.raises(rayk.Overloaded):
        next(cluster.stream(prompts[-1], params))
    for future in held:
        assert len(future.result(timeout=120).token_ids) == 64
    assert len(next(iter(cluster.stream(prompts[-1], rayk.SamplingParams(temperature=0, max_tokens=1)))).output.token_ids) == 1


INLINE_LIMIT = 100 * 1024  # Ray keeps a smaller object with its owner, out of the object store


def test_a_small_soak_loses_nothing_leaks_nothing_and_returns_memory_to_baseline(tmp_path):
    out = tmp_path / "soak.json"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--requests", "300", "--verify", "20", "--pull-fraction", "0.3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    soak = json.loads(out.read_text())
    requests, drained = soak["requests"], soak["drained"]
    assert requests["lost"] == 0 and requests["sent"] == 300
    assert requests["completed"] > 0 and requests["refused"] > 0  # offered above capacity: backpressure acted
    assert soak["faults"] and soak["verified"]["mismatched"] == 0 and soak["verified"]["compared"] == 20
    assert drained["leaked_blocks"] == 0 and drained["requests_left"] == 0 and drained["in_flight_left"] == 0
    assert drained["device_cached_after_reset"] == drained["host_cached_after_reset"] == 0
    # The object store was really used: blocks were pulled, each batch (one block or more) too big
    # to be inlined, the stores held them (peak above 0), and once drained they hold no more than
    # before the deployment.
    transfers, peaks, baseline = soak["transfers"], soak["peaks"], soak["baseline"]
    assert transfers["pulled_blocks"] > 0 and transfers["pulled_bytes"] / transfers["pulled_blocks"] > INLINE_LIMIT, transfers
    assert drained["object_store_created_bytes"] >= transfers["pulled_bytes"], (drained, transfers)
    assert peaks["object_store_bytes"] > INLINE_LIMIT and peaks["object_store_objects"] > 0, peaks
    assert drained["object_store_bytes"] <= baseline["bytes"] and drained["object_store_objects"] <= baseline["objects"], (drained, baseline)
    assert soak["peaks"]["in_flight"] <= soak["config"]["max_queued_requests"]
    assert soak["bad_inputs"] and all(x["clear"] for x in soak["bad_inputs"])
    assert "| **lost** (must be 0) | 0 |" in result.stdout
