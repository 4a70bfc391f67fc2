"""The router picks the cheapest worker, spreads new prefixes, and keeps bursts together.

The simulation at the end drives a ``Router`` and a ``PrefixDirectory`` with simulated workers
(LRU caches that emit real ``KVEventBatch`` es and report loads) and compares the hits with an
oracle computed from the trace alone.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass

import pytest

from rayk.cache.events import AllBlocksCleared, BlocksStored, EventBuffer, EventSequencer, KVEventBatch
from rayk.cluster.directory import PrefixDirectory
from rayk.cluster.routing import FetchPlan, RouteDecision, Router, WorkerLoad
from rayk.hashing import BlockHasher, model_fingerprint

BLOCK_SIZE = 16
HASHER = BlockHasher(model_fingerprint({"architecture": "routing-test"}), BLOCK_SIZE)


def _keys(tokens: list[int]) -> list[bytes]:
    return HASHER.hash_blocks(tokens)


def _tokens(seed: int, num_blocks: int, tail: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(num_blocks * BLOCK_SIZE + tail)]


def _cluster(num_workers: int, **router_options) -> tuple[PrefixDirectory, Router]:
    directory = PrefixDirectory()
    router = Router(directory, BLOCK_SIZE, **router_options)
    for i in range(num_workers):
        directory.register(f"worker-{i}", 0)
        router.add_worker(f"worker-{i}")
    return directory, router


def _store(directory: PrefixDirectory, worker_id: str, seq: int, keys: list[bytes], tier: str = "device") -> None:
    batch = KVEventBatch(seq, 0.0, (BlocksStored(tier, tuple(keys), HASHER.empty_root),))
    assert directory.apply(worker_id, 0, batch)


# -- the cost model ---------------------------------------------------------------------------


def test_a_request_goes_to_the_worker_holding_its_prefix():
    directory, router = _cluster(4)
    tokens = _tokens(1, 8)
    keys = _keys(tokens)
    _store(directory, "worker-2", 0, keys[:6])
    decision = router.route("r0", keys, len(tokens), now=0.0)
    assert decision.worker_id == "worker-2"
    assert decision.predicted_hit_tokens == 6 * BLOCK_SIZE == decision.oracle_hit_tokens
    assert decision.predicted_hit_by_tier == {"device": 6 * BLOCK_SIZE, "pending": 0, "host": 0, "disk": 0, "remote": 0}


def test_a_hit_never_covers_the_last_prompt_token():
    directory, router = _cluster(2)
    tokens = _tokens(2, 4, tail=0)  # exactly 4 blocks: the last block must be computed
    keys = _keys(tokens)
    _store(directory, "worker-1", 0, keys)
    decision = router.route("r0", keys, len(tokens), now=0.0)
    assert decision.worker_id == "worker-1"
    assert decision.predicted_hit_tokens == 3 * BLOCK_SIZE == decision.oracle_hit_tokens


def test_host_and_disk_hits_are_cheaper_than_a_miss_but_dearer_than_a_device_hit():
    directory = PrefixDirectory()
    tokens = _tokens(3, 8)
    keys = _keys(tokens)
    for worker_id, tier in (("on-disk", "disk"), ("on-host", "host"), ("on-device", "device"), ("empty", None)):
        directory.register(worker_id, 0)
        if tier is not None:
            _store(directory, worker_id, 0, keys, tier=tier)

    def choice(*worker_ids: str) -> RouteDecision:
        router = Router(directory, BLOCK_SIZE)
        for worker_id in worker_ids:
            router.add_worker(worker_id)
        return router.route("r0", keys, len(tokens), now=0.0)

    assert choice("on-disk", "on-host", "on-device", "empty").worker_id == "on-device"
    host = choice("on-disk", "on-host", "empty")
    assert host.worker_id == "on-host" and host.predicted_hit_by_tier["host"] == 8 * BLOCK_SIZE
    disk = choice("on-disk", "empty")
    assert disk.worker_id == "on-disk" and disk.predicted_hit_by_tier["disk"] == 8 * BLOCK_SIZE
    assert disk.estimated_cost_tokens > host.estimated_cost_tokens > choice("on-device").estimated_cost_tokens


def test_queued_work_outweighs_a_small_hit():
    directory, router = _cluster(2)
    tokens = _tokens(4, 8)
    keys = _keys(tokens)
    _store(directory, "worker-0", 0, keys[:1])
    router.report_load("worker-0", WorkerLoad(num_running=4, queued_prefill_tokens=2000), ())
    assert router.route("r0", keys, len(tokens), now=0.0).worker_id == "worker-1"


def test_routed_but_unreported_work_counts_until_the_worker_reports_receiving_it():
    directory, router = _cluster(2, policy="least_loaded")
    first = router.route("r0", _keys(_tokens(5, 8)), 8 * BLOCK_SIZE + 3, now=0.0)
    second = router.route("r1", _keys(_tokens(6, 8)), 8 * BLOCK_SIZE + 3, now=0.0)
    assert first.worker_id != second.worker_id, "the first route's work is queued on its worker"
    router.report_load(first.worker_id, WorkerLoad(), received_request_ids=["r0"])
    third = router.route("r2", _keys(_tokens(7, 8)), 8 * BLOCK_SIZE + 3, now=0.0)
    assert third.worker_id == first.worker_id, "received and computed: its worker is idle again"


# -- ties and new prefixes --------------------------------------------------------------------


def test_ties_spread_new_prefixes_over_the_workers():
    directory, router = _cluster(4)
    chosen = []
    for i in range(8):
        tokens = _tokens(100 + i, 4)
        decision = router.route(f"r{i}", _keys(tokens), len(tokens), now=0.0)
        router.report_load(decision.worker_id, WorkerLoad(), [decision.request_id])
        router.complete(decision.request_id, 0)
        chosen.append(decision.worker_id)
    assert sorted(chosen) == sorted([f"worker-{i}" for i in range(4)] * 2)


def _seed_prefixes(router: Router, first_seed: int, count: int, **route_options) -> list[str]:
    """Routes ``count`` requests with new prefixes one at a time; each worker stores the blocks
    (reports them) before the next request. Returns the workers chosen."""
    chosen = []
    for i in range(count):
        tokens = _tokens(first_seed + i, 4)
        decision = router.route(f"seed-{first_seed + i}", _keys(tokens), len(tokens), now=0.0, **route_options)
        router.report_load(decision.worker_id, WorkerLoad(), [decision.request_id])
        _store(router.directory, decision.worker_id, router.directory.next_seq(decision.worker_id), _keys(tokens))
        router.complete(decision.request_id, 0, now=0.0)
        chosen.append(decision.worker_id)
    return chosen


def test_new_prefixes_go_where_the_fewest_prefixes_are_held():
    directory, router = _cluster(4)
    _seed_prefixes(router, 390, 2, worker="worker-0")
    _seed_prefixes(router, 395, 1, worker="worker-1")
    assert sorted(_seed_prefixes(router, 400, 2)) == ["worker-2", "worker-3"]
    assert sorted(_seed_prefixes(router, 410, 3)) == ["worker-1", "worker-2", "worker-3"]
    assert directory.prefixes_held(directory.workers()) == [2, 2, 2, 2]


def test_prefixes_of_a_cleared_cache_do_not_decide_where_new_ones_go():
    directory, router = _cluster(3)
    _seed_prefixes(router, 420, 4)  # one worker seeds two prefixes
    for worker_id in directory.workers():
        batch = KVEventBatch(directory.next_seq(worker_id), 0.0, (AllBlocksCleared("device"),))
        assert directory.apply(worker_id, 0, batch)
    router.expire_claims(now=100.0)
    chosen = _seed_prefixes(router, 430, 6)
    assert sorted(chosen) == sorted(["worker-0", "worker-1", "worker-2"] * 2), chosen


# -- pending blocks ---------------------------------------------------------------------------


def test_work_a_worker_never_reports_receiving_stops_counting_after_the_ttl():
    # A driver that routed a request and never sent it (it crashed) must not load a worker forever.
    directory, router = _cluster(2, policy="least_loaded", pending_ttl_s=5.0)
    lost = router.route("lost", _keys(_tokens(30, 8)), 8 * BLOCK_SIZE + 3, now=0.0)
    assert router.route("r1", _keys(_tokens(31, 8)), 8 * BLOCK_SIZE + 3, now=1.0).worker_id != lost.worker_id
    router.complete("r1", 0, now=1.0)
    assert router.route("r2", _keys(_tokens(32, 8)), 8 * BLOCK_SIZE + 3, now=6.0).worker_id == lost.worker_id
    assert router.stats()["in_flight"] == 2, "it may still complete: only its load stops counting"


def test_a_burst_sharing_a_new_prefix_goes_to_one_worker_before_it_reports():
    directory, router = _cluster(4)
    prefix = _tokens(8, 16, tail=0)
    chosen = set()
    for i in range(4):
        tokens = prefix + _tokens(200 + i, 2)
        decision = router.route(f"r{i}", _keys(tokens), len(tokens), now=0.0)
        chosen.add(decision.worker_id)
        if i:
            assert decision.predicted_hit_by_tier["pending"] == 16 * BLOCK_SIZE
    assert len(chosen) == 1


def test_a_burst_waits_for_its_prefix_rather_than_compute_it_again_elsewhere():
    # Followers would wait for the pending prefix on its worker, and compute it themselves
    # anywhere else: that queued work is no reason to leave. Sized like the cluster test.
    directory, router = _cluster(3)
    prefix = _tokens(18, 3, tail=7)
    questions = [_tokens(220 + i, 0, tail=2 + i) for i in range(8)]
    chosen = {router.route(f"r{i}", _keys(prefix + q), len(prefix + q), now=0.0).worker_id for i, q in enumerate(questions)}
    assert len(chosen) == 1


def test_pending_claims_expire_after_the_ttl():
    directory, router = _cluster(4, pending_ttl_s=5.0)
    prefix = _tokens(9, 6, tail=0)
    tokens = prefix + _tokens(300, 2)
    first = router.route("r0", _keys(tokens), len(tokens), now=0.0)
    router.report_load(first.worker_id, WorkerLoad(), ["r0"])
    later = prefix + _tokens(301, 2)
    assert router.route("r1", _keys(later), len(later), now=4.0).predicted_hit_tokens == 6 * BLOCK_SIZE
    router.complete("r1", 0)
    after_ttl = router.route("r2", _keys(later), len(later), now=5.5)
    assert after_ttl.predicted_hit_tokens == 0 and after_ttl.oracle_hit_tokens == 0


def test_a_completed_request_keeps_its_claims_until_the_worker_reports_storing_them():
    # A short request can finish before its worker's next event batch: the next member of its
    # group must still find the prefix where it was computed.
    directory, router = _cluster(4)
    prefix = _tokens(10, 6, tail=0)
    first_tokens = prefix + _tokens(310, 1)
    first = router.route("r0", _keys(first_tokens), len(first_tokens), now=0.0)
    router.report_load(first.worker_id, WorkerLoad(), ["r0"])
    router.complete("r0", 0)
    later = prefix + _tokens(311, 1)
    second = router.route("r1", _keys(later), len(later), now=1.0)
    assert second.worker_id == first.worker_id and second.predicted_hit_by_tier["pending"] == 6 * BLOCK_SIZE
    _store(directory, first.worker_id, 0, _keys(first_tokens))
    third = router.route("r2", _keys(later), len(later), now=2.0)
    assert third.worker_id == first.worker_id and third.predicted_hit_by_tier["device"] == 6 * BLOCK_SIZE


def test_a_completed_request_keeps_its_claims_only_briefly():
    directory, router = _cluster(4, pending_ttl_s=10.0, completed_claim_s=1.0)
    tokens = _tokens(12, 6)
    router.route("r0", _keys(tokens), len(tokens), now=0.0)
    router.complete("r0", 0, now=3.0)
    router.expire_claims(now=3.9)
    assert router.stats()["pending_claims"] == 1
    router.expire_claims(now=4.1)
    assert router.stats()["pending_claims"] == 0
    assert router.route("r1", _keys(tokens), len(tokens), now=4.2).oracle_hit_tokens == 0


def test_a_failure_ends_the_pending_claims():
    directory, router = _cluster(2)
    tokens = _tokens(10, 6)
    keys = _keys(tokens)
    router.route("r0", keys, len(tokens), now=0.0)
    router.complete("r0", None)
    assert router.route("r1", keys, len(tokens), now=0.0).oracle_hit_tokens == 0


def test_a_stored_key_is_no_longer_pending_but_held():
    directory, router = _cluster(2)
    tokens = _tokens(11, 6)
    keys = _keys(tokens)
    first = router.route("r0", keys, len(tokens), now=0.0)
    _store(directory, first.worker_id, 0, keys)
    second = router.route("r1", keys, len(tokens), now=0.0)
    assert second.worker_id == first.worker_id
    assert second.predicted_hit_by_tier == {"device": 6 * BLOCK_SIZE, "pending": 0, "host": 0, "disk": 0, "remote": 0}


def test_removing_a_worker_drops_its_in_flight_requests_and_pending_claims():
    directory, router = _cluster(2)
    tokens = _tokens(12, 6)
    keys = _keys(tokens)
    first = router.route("r0", keys, len(tokens), now=0.0)
    router.remove_worker(first.worker_id)
    assert router.stats()["in_flight"] == 0 and router.stats()["dropped"] == 1
    second = router.route("r1", keys, len(tokens), now=0.0)
    assert second.worker_id != first.worker_id and second.oracle_hit_tokens == 0
    router.complete("r0", 0)  # a late completion of a forgotten request changes nothing
    assert router.stats()["completed"] == 0


def test_choose_records_nothing():
    directory, router = _cluster(2)
    tokens = _tokens(14, 4)
    keys = _keys(tokens)
    _store(directory, "worker-1", 0, keys)
    choice = router.choose(keys, len(tokens))
    assert choice.worker_id == "worker-1" and choice.hit.device == 4 and choice.oracle_blocks == 4
    assert router.choose(keys, len(tokens)) == choice
    assert router.stats()["decisions"] == {} and directory.match(_keys(_tokens(15, 4))) == {}
    assert [router.choose([], 5, policy="round_robin").worker_id for _ in range(3)] == ["worker-0"] * 3


# -- route-or-pull ----------------------------------------------------------------------------


def test_a_busy_holder_loses_its_request_to_an_idle_worker_that_pulls():
    directory, router = _cluster(3)
    tokens = _tokens(31, 40)
    keys = _keys(tokens)
    _store(directory, "worker-1", 0, keys)
    router.report_load("worker-1", WorkerLoad(num_running=8, queued_prefill_tokens=8000), ())
    router.report_load("worker-2", WorkerLoad(num_running=1), ())
    decision = router.route("r0", keys, len(tokens), now=0.0)
    assert decision.worker_id == "worker-0"
    assert decision.plan is not None and decision.plan.source == "worker-1" and decision.plan.keys == tuple(keys)
    assert decision.predicted_hit_by_tier["remote"] == decision.predicted_hit_tokens == 40 * BLOCK_SIZE
    # The pulled keys are pending on the puller: the next member of the group finds them there.
    assert router.route("r1", keys, len(tokens), now=0.0).worker_id == "worker-0"
    stats = router.stats()
    assert stats["pull_plans"] == 1 and stats["planned_pull_tokens"] == 40 * BLOCK_SIZE


def test_an_idle_holder_keeps_its_request_and_a_pull_brings_only_what_is_missing():
    directory, router = _cluster(2)
    tokens = _tokens(32, 10)
    keys = _keys(tokens)
    _store(directory, "worker-0", 0, keys)
    assert router.route("r0", keys, len(tokens), now=0.0).plan is None
    _store(directory, "worker-1", 0, keys[:4])
    router.report_load("worker-0", WorkerLoad(num_running=8, queued_prefill_tokens=9000), ())
    decision = router.route("r1", keys, len(tokens), now=0.0)
    assert decision.worker_id == "worker-1" and decision.plan.keys == tuple(keys[4:])
    assert decision.predicted_hit_by_tier["device"] == 4 * BLOCK_SIZE and decision.predicted_hit_by_tier["remote"] == 6 * BLOCK_SIZE


def test_an_idle_worker_that_holds_the_whole_prefix_is_never_planned_a_pull():
    directory, router = _cluster(2)
    tokens = _tokens(36, 10)
    keys = _keys(tokens)
    _store(directory, "worker-0", 0, keys)
    _store(directory, "worker-1", 0, keys)
    router.report_load("worker-0", WorkerLoad(num_running=8, queued_prefill_tokens=9000), ())
    decision = router.route("r0", keys, len(tokens), now=0.0)
    assert decision.worker_id == "worker-1" and decision.plan is None


def test_a_measured_slow_pull_is_not_chosen_and_counts_as_a_recompute():
    directory, router = _cluster(2)
    tokens = _tokens(33, 40)
    keys = _keys(tokens)
    _store(directory, "worker-1", 0, keys)
    router.report_load("worker-1", WorkerLoad(num_running=8, queued_prefill_tokens=8000), ())
    router.report_load("worker-0", WorkerLoad(prefill_tokens_per_s=1000.0, pull_tokens_per_s=900.0), ())
    decision = router.route("r0", keys, len(tokens), now=0.0)
    assert decision.worker_id == "worker-0" and decision.plan is None and decision.predicted_hit_tokens == 0
    assert router.stats()["recomputes_chosen"] == 1


@pytest.mark.parametrize("pull", ["always", "never"])
def test_pull_always_and_never_decide_for_a_forced_worker(pull):
    directory, router = _cluster(2, pull="auto")
    tokens = _tokens(34, 5)
    keys = _keys(tokens)
    _store(directory, "worker-0", 0, keys)
    decision = router.route("r0", keys, len(tokens), worker="worker-1", pull=pull, now=0.0)
    assert decision.worker_id == "worker-1"
    assert (decision.plan is not None) == (pull == "always")
    if pull == "always":
        assert decision.plan == FetchPlan("worker-0", tuple(keys))


def test_pending_blocks_are_never_pulled():
    directory, router = _cluster(2)
    tokens = _tokens(35, 8)
    keys = _keys(tokens)
    first = router.route("r0", keys, len(tokens), now=0.0)
    other = "worker-1" if first.worker_id == "worker-0" else "worker-0"
    decision = router.route("r1", keys, len(tokens), worker=other, pull="always", now=0.0)
    assert decision.plan is None


def test_pull_options_are_checked():
    with pytest.raises(ValueError, match="pull must be one of"):
        _cluster(1, pull="sometimes")
    directory, router = _cluster(1)
    with pytest.raises(ValueError, match="pull must be one of"):
        router.route("r0", _keys(_tokens(1, 2)), 40, pull="maybe", now=0.0)
    with pytest.raises(ValueError, match="prefill_tokens_per_s"):
        WorkerLoad(prefill_tokens_per_s=-1.0)


# -- hot prefixes -----------------------------------------------------------------------------


def _route_in_turn(router: Router, prefix: list[int], first_seed: int, count: int, start: float = 0.0) -> list[RouteDecision]:
    """Routes ``count`` requests behind ``prefix`` one at a time, each finished (and a pulled
    prefix stored by its puller) before the next."""
    directory, decisions = router.directory, []
    for i in range(count):
        tokens = prefix + _tokens(first_seed + i, 2)
        decision = router.route(f"turn-{first_seed + i}", _keys(tokens), len(tokens), now=start + i)
        router.report_load(decision.worker_id, WorkerLoad(), [decision.request_id])
        if decision.plan is not None:
            _store(directory, decision.worker_id, directory.next_seq(decision.worker_id), list(decision.plan.keys))
        router.complete(decision.request_id, decision.predicted_hit_tokens, now=start + i)
        decisions.append(decision)
    return decisions


def test_a_hot_prefix_gains_holders_that_pull_it_from_its_holder():
    directory, router = _cluster(4)
    prefix = _tokens(60, 20, tail=0)
    _store(directory, "worker-0", 0, _keys(prefix))
    decisions = _route_in_turn(router, prefix, 600, 16)
    assert all(d.worker_id == "worker-0" and d.plan is None for d in decisions[:9]), "8 recent requests before it is hot"
    replicas = [d for d in decisions if d.plan is not None]
    assert decisions[9] == replicas[0] and len(replicas) == router.stats()["replications"] == 2
    for replica in replicas:
        assert replica.worker_id != "worker-0" and replica.plan == FetchPlan("worker-0", tuple(_keys(prefix)))
        assert replica.predicted_hit_by_tier["remote"] == 20 * BLOCK_SIZE
    assert {d.worker_id for d in decisions} == {"worker-0", replicas[0].worker_id, replicas[1].worker_id}


def test_a_hot_prefix_is_not_replicated_with_replication_off():
    directory, router = _cluster(4, replicate_hot_prefixes=False)
    prefix = _tokens(61, 20, tail=0)
    _store(directory, "worker-0", 0, _keys(prefix))
    assert {d.worker_id for d in _route_in_turn(router, prefix, 620, 16)} == {"worker-0"}
    assert router.stats()["replications"] == 0


def test_a_prefix_is_hot_for_its_recent_requests_only():
    directory, router = _cluster(4)
    prefix = _tokens(62, 20, tail=0)
    _store(directory, "worker-0", 0, _keys(prefix))
    _route_in_turn(router, prefix, 640, 7)
    for i in range(600):  # 4.7 half-lives of other prefixes: the 7 weigh about 0.3 now
        router.route(f"other-{i}", _keys(_tokens(10_000 + i, 1)), BLOCK_SIZE + 1, now=10.0)
        router.complete(f"other-{i}", 0, now=10.0)
    assert all(d.plan is None and d.worker_id == "worker-0" for d in _route_in_turn(router, prefix, 660, 3, start=20.0))


def test_recent_counts_stay_finite_over_many_half_lives():
    directory, router = _cluster(4, share_half_life=8)  # the weights are rescaled every 64 half-lives
    for i in range(1100):
        router.route(f"other-{i}", _keys(_tokens(20_000 + i, 1)), BLOCK_SIZE + 1, now=0.0)
        router.complete(f"other-{i}", 0, now=0.0)
    prefix = _tokens(63, 20, tail=0)
    _store(directory, "worker-0", 0, _keys(prefix))
    assert any(d.plan is not None for d in _route_in_turn(router, prefix, 680, 24, start=1.0))


def test_replication_options_are_checked():
    with pytest.raises(ValueError, match="share_half_life must be an int >= 1"):
        _cluster(1, share_half_life=0)
    with pytest.raises(ValueError, match="replicate_hot_prefixes must be True or False"):
        _cluster(1, replicate_hot_prefixes="yes")


# -- the boundary -----------------------------------------------------------------------------


def test_an_unknown_forced_worker_is_an_error_naming_the_known_ones():
    directory, router = _cluster(2)
    with pytest.raises(ValueError, match=r"'worker-9'.*'worker-0', 'worker-1'"):
        router.route("r0", [], 10, worker="worker-9")
    assert router.route("r1", [], 10, worker="worker-1", now=0.0).worker_id == "worker-1"


def test_an_unknown_policy_is_an_error_listing_the_policies():
    directory, router = _cluster(2)
    with pytest.raises(ValueError, match=r"round_robin.*'fastest'"):
        router.route("r0", [], 10, policy="fastest")
    with pytest.raises(ValueError, match="policy"):
        Router(directory, BLOCK_SIZE, policy="fastest")


def test_routing_with_no_workers_is_a_clear_error():
    router = Router(PrefixDirectory(), BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="no workers"):
        router.route("r0", [], 10)


def test_bad_arguments_name_the_field():
    directory, router = _cluster(1)
    with pytest.raises(ValueError, match="num_tokens"):
        router.route("r0", [], 0)
    router.route("r1", [], 5, now=0.0)
    with pytest.raises(ValueError, match="already in flight"):
        router.route("r1", [], 5, now=0.0)
    with pytest.raises(ValueError, match="not registered in the directory"):
        router.add_worker("worker-7")
    with pytest.raises(ValueError, match="tier_costs"):
        Router(directory, BLOCK_SIZE, tier_costs={"device": 0.0})
    with pytest.raises(ValueError, match="block_size"):
        Router(directory, 0)
    with pytest.raises(ValueError, match="WorkerLoad.num_running"):
        WorkerLoad(num_running=-1)


def test_policy_override_and_baselines_route_every_request():
    directory, router = _cluster(3, seed=7)
    chosen = {policy: [] for policy in Router.POLICIES}
    for i in range(12):
        for policy in Router.POLICIES:
            decision = router.route(f"{policy}-{i}", [], 5, policy=policy, now=0.0)
            assert decision.policy == policy
            chosen[policy].append(decision.worker_id)
            router.complete(decision.request_id, 0)
    assert chosen["round_robin"] == [f"worker-{i % 3}" for i in range(12)]
    assert set(chosen["random"]) == {"worker-0", "worker-1", "worker-2"}
    assert router.stats()["decisions"] == {policy: 12 for policy in Router.POLICIES}


def test_stats_add_up():
    directory, router = _cluster(2)
    tokens = _tokens(13, 4)
    keys = _keys(tokens)
    _store(directory, "worker-0", 0, keys)
    decisions = [router.route(f"r{i}", keys, len(tokens), now=0.0) for i in range(3)]
    router.complete("r0", 4 * BLOCK_SIZE)
    router.complete("r1", 2 * BLOCK_SIZE)
    router.complete("r2", None)
    stats = router.stats()
    assert stats["decisions"] == {"prefix": 3}
    assert stats["predicted_hit_tokens"] == sum(d.predicted_hit_tokens for d in decisions) == 3 * 4 * BLOCK_SIZE
    assert stats["oracle_hit_tokens"] == sum(d.oracle_hit_tokens for d in decisions)
    assert stats["hit_vs_oracle"] == 1.0
    assert stats["completed"] == 2 and stats["failed"] == 1 and stats["in_flight"] == 0
    assert stats["completed_predicted_hit_tokens"] == 8 * BLOCK_SIZE
    assert stats["actual_hit_tokens"] == 6 * BLOCK_SIZE
    assert stats["prediction_error_tokens"] == 2 * BLOCK_SIZE
    assert stats["prediction_accuracy"] == pytest.approx(1 - 2 / 8)
    assert stats["exact_predictions"] == 1
    assert sum(stats["routed_per_worker"].values()) == 3


# -- simulation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    request_id: str
    keys: list[bytes]
    num_tokens: int
    group: int


def _grouped_trace(num_groups: int = 16, per_group: int = 16, prefix_blocks: int = 8, seed: int = 0) -> list[_Prompt]:
    """``num_groups`` system prompts of ``prefix_blocks`` blocks, each followed by
    ``per_group`` unique questions of 1-2 blocks and a partial block, shuffled."""
    rng = random.Random(seed)
    prompts = []
    for group in range(num_groups):
        prefix = [rng.randrange(32000) for _ in range(prefix_blocks * BLOCK_SIZE)]
        for member in range(per_group):
            question = [rng.randrange(32000) for _ in range(rng.randint(1, 2) * BLOCK_SIZE + rng.randint(1, BLOCK_SIZE - 1))]
            tokens = prefix + question
            prompts.append(_Prompt(f"g{group}-m{member}", _keys(tokens), len(tokens), group))
    rng.shuffle(prompts)
    return prompts


def _hot_trace(num_prompts: int = 256, hot_fraction: float = 0.8, num_groups: int = 16, seed: int = 0) -> list[_Prompt]:
    """Prompts like ``_grouped_trace``'s (a group's 8-block system prompt, then a question of
    its own), but ``hot_fraction`` of them behind one hot system prompt and the rest spread
    over the other ``num_groups`` - 1, shuffled."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32000) for _ in range(8 * BLOCK_SIZE)] for _ in range(num_groups)]
    num_hot = round(hot_fraction * num_prompts)
    owners = [0] * num_hot + [1 + i % (num_groups - 1) for i in range(num_prompts - num_hot)]
    rng.shuffle(owners)
    prompts = []
    for i, group in enumerate(owners):
        tokens = prefixes[group] + [rng.randrange(32000) for _ in range(2 * BLOCK_SIZE + 5)]
        prompts.append(_Prompt(f"g{group}-h{i}", _keys(tokens), len(tokens), group))
    return prompts


def _oracle_hits(trace: list[_Prompt]) -> dict[str, int]:
    """Per request: the longest prefix it shares with any earlier request (tokens, capped)."""
    seen: set[bytes] = set()
    hits = {}
    for prompt in trace:
        cap = min(len(prompt.keys), (prompt.num_tokens - 1) // BLOCK_SIZE)
        blocks = 0
        while blocks < cap and prompt.keys[blocks] in seen:
            blocks += 1
        hits[prompt.request_id] = blocks * BLOCK_SIZE
        seen.update(prompt.keys)
    return hits


class _SimWorker:
    """A worker with one LRU device cache (``capacity`` blocks, None: unbounded) that admits what
    it received at its next step, prefills it in that step, and decodes for a few steps."""

    def __init__(self, worker_id: str, capacity: int | None, rng: random.Random):
        self.worker_id = worker_id
        self.capacity = capacity
        self.rng = rng
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.events = EventBuffer("device")
        self.sequencer = EventSequencer()
        self.inbox: list[_Prompt] = []
        self.running: dict[str, list[int]] = {}  # request id -> [steps left, hit tokens]

    def step(self) -> tuple[KVEventBatch | None, WorkerLoad, list[str], list[tuple[str, int]]]:
        received = [prompt.request_id for prompt in self.inbox]
        for prompt in self.inbox:
            self.running[prompt.request_id] = [self.rng.randint(2, 6), self._prefill(prompt)]
        self.inbox = []
        finished = []
        for request_id, state in list(self.running.items()):
            state[0] -= 1
            if state[0] == 0:
                finished.append((request_id, state[1]))
                del self.running[request_id]
        events = self.events.drain()
        batch = self.sequencer.batch(events) if events else None
        return batch, WorkerLoad(num_running=len(self.running)), received, finished

    def _prefill(self, prompt: _Prompt) -> int:
        cap = min(len(prompt.keys), (prompt.num_tokens - 1) // BLOCK_SIZE)
        hit = 0
        while hit < cap and prompt.keys[hit] in self.cache:
            self.cache.move_to_end(prompt.keys[hit])
            hit += 1
        parent = HASHER.empty_root
        for key in prompt.keys:
            if key in self.cache:
                self.cache.move_to_end(key)
            else:
                self.cache[key] = None
                self.events.stored(key, parent)
            parent = key
        while self.capacity is not None and len(self.cache) > self.capacity:
            evicted, _ = self.cache.popitem(last=False)
            self.events.removed(evicted)
        return hit * BLOCK_SIZE


def _simulate(
    policy: str, concurrency: int, capacity: int | None = None, seed: int = 0, num_workers: int = 4, trace: list[_Prompt] | None = None, **router_options
) -> dict:
    """Routes ``trace`` (the grouped trace by default) with ``concurrency`` requests in flight;
    returns the hit ratio (actual hit tokens / oracle hit tokens) and the imbalance (max / mean
    requests per worker)."""
    trace = _grouped_trace(seed=seed) if trace is None else trace
    oracle = _oracle_hits(trace)
    directory, router = _cluster(num_workers, policy=policy, seed=seed, pull="never", **router_options)  # simulated workers do not pull
    rng = random.Random(seed)
    workers = {worker_id: _SimWorker(worker_id, capacity, rng) for worker_id in directory.workers()}
    queue, in_flight, actual, step = deque(trace), 0, {}, 0
    decisions: list[RouteDecision] = []
    while queue or in_flight:
        while queue and in_flight < concurrency:
            prompt = queue.popleft()
            decision = router.route(prompt.request_id, prompt.keys, prompt.num_tokens, now=float(step))
            decisions.append(decision)
            workers[decision.worker_id].inbox.append(prompt)
            in_flight += 1
        step += 1
        for worker in workers.values():
            batch, load, received, finished = worker.step()
            if batch is not None:
                assert directory.apply(worker.worker_id, 0, batch), "the simulation never loses a batch"
            router.report_load(worker.worker_id, load, received)
            for request_id, hit in finished:
                router.complete(request_id, hit)
                actual[request_id] = hit
                in_flight -= 1
    directory.check_invariants()
    per_worker = router.stats()["routed_per_worker"]
    counts = [per_worker.get(worker_id, 0) for worker_id in workers]
    return {
        "hit_ratio": sum(actual.values()) / sum(oracle.values()),
        "imbalance": max(counts) / (sum(counts) / len(counts)),
        "predicted_ratio": sum(d.predicted_hit_tokens for d in decisions) / sum(oracle.values()),
        "stats": router.stats(),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_prefix_routing_reaches_the_oracle_with_balanced_workers(concurrency, seed):
    result = _simulate("prefix", concurrency, seed=seed)
    assert result["hit_ratio"] == 1.0, result
    assert result["imbalance"] <= 1.1, result
    assert result["stats"]["prediction_accuracy"] == 1.0, result
    assert result["stats"]["replications"] == 0, "no prefix of an even workload is hot"


# 16 prefixes of 8 blocks (128 hot blocks) and 384 unique blocks of questions: more than one
# worker's 64 blocks, and the hot blocks fit in all four only if the prefixes spread.
MEMORY_PRESSURE = 64


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_prefix_routing_holds_the_oracle_under_memory_pressure(concurrency, seed):
    result = _simulate("prefix", concurrency, capacity=MEMORY_PRESSURE, seed=seed)
    assert result["hit_ratio"] >= 0.95, result
    # A prefix evicted late and seeded again may land on another worker: a looser bound.
    assert result["imbalance"] <= 1.25, result


@pytest.mark.parametrize("capacity", [None, MEMORY_PRESSURE])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_a_hot_prefix_is_replicated_so_that_its_requests_spread(concurrency, seed, capacity):
    """80% of the requests behind one prefix: it gains holders until they take no more than the
    others, each computing it once (simulated workers cannot pull). Without replication its one
    holder takes most of the requests. Under memory pressure the replicas take room the cold
    prefixes had, so a few more of those are evicted before they are used again."""
    result = _simulate("prefix", concurrency, capacity=capacity, seed=seed, trace=_hot_trace(seed=seed))
    unreplicated = _simulate("prefix", concurrency, capacity=capacity, seed=seed, trace=_hot_trace(seed=seed), replicate_hot_prefixes=False)
    assert result["imbalance"] <= 1.15 < 3.0 <= unreplicated["imbalance"], (result, unreplicated)
    assert result["stats"]["replications"] == 3 and unreplicated["stats"]["replications"] == 0
    assert result["hit_ratio"] >= (0.98 if capacity is None else 0.92), result


@pytest.mark.parametrize("capacity", [None, MEMORY_PRESSURE])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_round_robin_balances_but_hits_less_on_the_same_trace(concurrency, capacity):
    prefix = _simulate("prefix", concurrency, capacity=capacity)
    round_robin = _simulate("round_robin", concurrency, capacity=capacity)
    assert prefix["imbalance"] <= 1.1 and round_robin["imbalance"] <= 1.1
    assert prefix["hit_ratio"] >= 0.95 and round_robin["hit_ratio"] < 0.85, (prefix, round_robin)
