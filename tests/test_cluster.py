"""The cluster end to end on a real two-node Ray cluster (``ray.cluster_utils.Cluster``, each node
with its own object store, bound to loopback): routing that hits the cache and stays balanced,
bursts, tenants, stats, and every greedy output equal to transformers'."""

from __future__ import annotations

import collections
import time

import pytest
import ray

import rayk
from tests.conftest import BLOCK_SIZE, hf_greedy, local_ray_nodes, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
NAMESPACE = "rayk-test-cluster"
NUM_WORKERS = 3


@pytest.fixture(scope="module")
def ray_nodes():
    with local_ray_nodes(NAMESPACE, 2, 2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cluster(ray_nodes, tiny_llama_dir):
    with rayk.Cluster(str(tiny_llama_dir), num_workers=NUM_WORKERS, namespace=NAMESPACE, block_size=BLOCK_SIZE, liveness_timeout_s=2.0) as cluster:
        yield cluster


@pytest.fixture()
def fresh(cluster):
    """The cluster with every worker's cache emptied. A reset returns once the coordinator has
    seen it: an empty directory, and no claim of an earlier request left pending."""
    cluster.reset_prefix_cache()
    stats = cluster.stats()
    assert stats["directory"]["blocks"] == 0 and stats["routing"]["pending_claims"] == 0, stats["directory"]
    return cluster


def _groups(num_groups: int, members: int, seed: int, prefix_len: int = 50) -> list[list[list[int]]]:
    """Prompt groups: a shared prefix of ``prefix_len`` tokens, then a short unique question."""
    prefixes = random_prompts([prefix_len] * num_groups, seed=seed)
    questions = random_prompts([3 + i % 5 for i in range(num_groups * members)], seed=seed + 1)
    return [[prefixes[g] + questions[g * members + m] for m in range(members)] for g in range(num_groups)]


def _check_against_transformers(model_dir, prompts, outputs) -> None:
    assert [o.token_ids for o in outputs] == hf_greedy(model_dir, prompts, GREEDY.max_tokens)


def test_workers_are_named_actors_spread_over_both_nodes(cluster):
    stats = cluster.stats()
    assert sorted(stats["workers"]) == [f"worker-{i}" for i in range(NUM_WORKERS)]
    assert {w["actor_name"] for w in stats["workers"].values()} == {f"rayk-worker-{i}" for i in range(NUM_WORKERS)}
    assert len({w["node_id"] for w in stats["workers"].values()}) == 2
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    assert {"rayk-coordinator", "rayk-worker-0", "rayk-worker-1", "rayk-worker-2"} <= names


def test_prefix_routing_sends_a_group_to_its_holder_and_hits_where_round_robin_misses(fresh, tiny_llama_dir):
    groups = _groups(4, 3, seed=100)
    order = [groups[g][m] for m in range(3) for g in range(4)]  # interleaved, one at a time
    prefix_outputs = [fresh.generate(p, GREEDY)[0] for p in order]
    _check_against_transformers(tiny_llama_dir, order, prefix_outputs)
    by_group = collections.defaultdict(set)
    for i, output in enumerate(prefix_outputs):
        by_group[i % 4].add(output.worker)
    assert all(len(workers) == 1 for workers in by_group.values())
    prefix_hits = sum(o.num_cached_tokens for o in prefix_outputs)
    assert prefix_hits == 4 * 2 * 48  # every later member hits the 3 shared blocks: the oracle

    fresh.reset_prefix_cache()
    round_robin_outputs = [fresh.generate(p, GREEDY, routing="round_robin")[0] for p in order]
    _check_against_transformers(tiny_llama_dir, order, round_robin_outputs)
    assert sum(o.num_cached_tokens for o in round_robin_outputs) < prefix_hits


def test_groups_spread_over_the_workers_one_at_a_time_and_all_at_once(fresh, tiny_llama_dir):
    groups = _groups(6, 3, seed=200)
    sequential = [fresh.generate(p, GREEDY)[0] for m in range(3) for p in (g[m] for g in groups)]
    counts = collections.Counter(o.worker for o in sequential)
    assert sorted(counts.values()) == [6, 6, 6]

    fresh.reset_prefix_cache()
    burst_groups = _groups(6, 3, seed=300)
    prompts = [p for g in burst_groups for p in g]
    outputs = fresh.generate(prompts, GREEDY)
    _check_against_transformers(tiny_llama_dir, prompts, outputs)
    counts = collections.Counter(o.worker for o in outputs)
    assert len(counts) == NUM_WORKERS and max(counts.values()) <= 2 * min(counts.values())
    for g in range(6):
        assert len({o.worker for o in outputs[3 * g : 3 * g + 3]}) == 1


def test_a_burst_sharing_a_new_prefix_is_computed_once_in_the_cluster(fresh, tiny_llama_dir):
    shared = random_prompts([55], seed=400)[0]
    prompts = [shared + q for q in random_prompts([2, 4, 6, 8, 3, 5, 7, 9], seed=401)]
    outputs = fresh.generate(prompts, GREEDY)
    _check_against_transformers(tiny_llama_dir, prompts, outputs)
    assert len({o.worker for o in outputs}) == 1
    assert sorted(o.num_cached_tokens for o in outputs) == [0] + [48] * 7


def test_the_same_salt_hits_anywhere_and_another_salt_never_shares(fresh):
    prompt = random_prompts([60], seed=500)[0]
    first = fresh.generate(prompt, GREEDY, cache_salt="tenant-a")[0]
    same = fresh.generate(prompt, GREEDY, cache_salt="tenant-a")[0]
    other = fresh.generate(prompt, GREEDY, cache_salt="tenant-b")[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens == 48
    assert other.num_cached_tokens == 0
    assert same.token_ids == other.token_ids == first.token_ids
    forced = fresh.generate(prompt, GREEDY, cache_salt="tenant-a", worker=next(w for w in fresh.workers() if w != first.worker))[0]
    assert forced.num_cached_tokens == 0  # a worker that never saw the prompt computes it


def test_submit_and_stream_serve_the_same_tokens(cluster, tiny_llama_dir):
    prompts = random_prompts([12, 30], seed=600)
    futures = [cluster.submit(p, GREEDY) for p in prompts]
    outputs = [f.result(timeout=60) for f in futures]
    _check_against_transformers(tiny_llama_dir, prompts, outputs)
    deltas = list(cluster.stream(prompts[1], GREEDY))
    assert [t for d in deltas for t in d.new_token_ids] == outputs[1].token_ids
    assert deltas[-1].finished and deltas[-1].output.worker in cluster.workers()


def test_stats_carry_every_section_and_the_workers_add_up_to_the_cluster(cluster):
    cluster.generate(random_prompts([40, 41, 42], seed=700), GREEDY)
    stats = cluster.stats()
    workers, total = stats["workers"].values(), stats["cluster"]
    for section, key in [("prefix_cache", "hit_tokens"), ("prefix_cache", "query_tokens"), ("requests", "finished"), ("device_pool", "num_blocks"), ("load", "free_blocks")]:
        assert total[section][key] == sum(w[section][key] for w in workers)
    assert set(total) == set(next(iter(workers)))
    assert set(stats["directory"]["workers"]) <= set(stats["workers"])
    routing = stats["routing"]
    assert sum(routing["decisions"].values()) >= 3


def test_an_unknown_worker_and_a_bad_prompt_are_refused_before_anything_runs(cluster):
    finished = cluster.stats()["cluster"]["requests"]["finished"]
    with pytest.raises(ValueError, match="worker-9"):
        cluster.generate([1, 2, 3], GREEDY, worker="worker-9")
    with pytest.raises(ValueError, match=r"prompts\[1\] holds token id"):
        cluster.generate([[1, 2, 3], [10**6]], GREEDY)
    with pytest.raises(ValueError, match="routing must be one of"):
        cluster.generate([1, 2, 3], GREEDY, routing="nearest")
    assert cluster.stats()["cluster"]["requests"]["finished"] == finished


def test_a_second_cluster_in_the_namespace_is_refused_and_the_first_keeps_serving(cluster, tiny_llama_dir):
    with pytest.raises(ValueError, match="already running in namespace 'rayk-test-cluster'"):
        rayk.Cluster(str(tiny_llama_dir), num_workers=1, namespace=NAMESPACE, block_size=BLOCK_SIZE)
    assert len(cluster.workers()) == NUM_WORKERS
    assert cluster.generate(random_prompts([12], seed=750)[0], GREEDY)[0].token_ids


def test_bad_cluster_options_are_refused_before_anything_starts(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"liveness_timeout_s must be .* >= 1.0 .* got 0.2"):
        rayk.Cluster(str(tiny_llama_dir), namespace="rayk-never-started", liveness_timeout_s=0.2)
    with pytest.raises(ValueError, match="routing must be one of"):
        rayk.Cluster(str(tiny_llama_dir), namespace="rayk-never-started", routing="nearest")


def test_a_stream_abandoned_early_stops_generating_on_its_worker(cluster):
    long = rayk.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    before = cluster.stats()["cluster"]["requests"]["generated_tokens"]
    for _ in cluster.stream(random_prompts([10], seed=760)[0], long):
        break  # the caller stops reading after the first delta
    deadline = time.monotonic() + 10
    while cluster.stats()["cluster"]["load"]["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    # Not cancelled, it would still be running, or have generated all 400 tokens.
    stats = cluster.stats()["cluster"]
    assert stats["load"]["running"] == 0 and stats["requests"]["generated_tokens"] - before < 400


def test_connect_attaches_to_the_running_deployment_and_refuses_an_empty_namespace(cluster, tiny_llama_dir):
    attached = rayk.connect(namespace=NAMESPACE)
    prompt = random_prompts([20], seed=800)[0]
    assert attached.generate(prompt, GREEDY)[0].token_ids == hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)[0]
    with pytest.raises(ValueError, match="no rayk deployment"):
        rayk.connect(namespace="rayk-nobody-here")


def test_a_restarted_coordinator_rebuilds_the_directory_from_the_workers_inventories(fresh, tiny_llama_dir):
    prompt = random_prompts([50], seed=850)[0]
    first = fresh.generate(prompt, GREEDY)[0]
    ray.kill(ray.get_actor("rayk-coordinator", namespace=NAMESPACE), no_restart=False)
    deadline, stats = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        try:
            stats = fresh.stats()  # while it restarts: an error, then no workers, then one by one
        except ray.exceptions.RayActorError:
            time.sleep(0.1)
            continue
        liveness = stats["liveness"]
        if len(liveness["workers"]) == NUM_WORKERS and liveness["inventories"] >= NUM_WORKERS and stats["directory"]["blocks"]:
            break
        time.sleep(0.1)
    assert stats is not None and sorted(stats["liveness"]["workers"]) == [f"worker-{i}" for i in range(NUM_WORKERS)], stats
    assert stats["routing"]["decisions"] == {}, "the restarted coordinator starts empty"
    again = fresh.generate(prompt, GREEDY)[0]
    assert again.worker == first.worker and again.num_cached_tokens == 48
    assert again.token_ids == first.token_ids == hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)[0]


def test_a_dead_worker_leaves_the_directory_and_its_requests_go_elsewhere(cluster, tiny_llama_dir):
    """Last in the module: it kills a worker."""
    prompt = random_prompts([50], seed=900)[0]
    victim = cluster.generate(prompt, GREEDY)[0].worker
    ray.kill(ray.get_actor(f"rayk-{victim}", namespace=NAMESPACE), no_restart=True)
    killed = time.monotonic()
    while victim in cluster.workers():
        assert time.monotonic() - killed < 1.25 * 2.0 + 1.0, "the dead worker stayed in the routing table"
        time.sleep(0.05)
    assert victim not in cluster.stats()["directory"]["workers"]
    output = cluster.generate(prompt, GREEDY)[0]
    assert output.worker != victim
    assert output.token_ids == hf_greedy(tiny_llama_dir, [prompt], GREEDY.max_tokens)[0]
