"""The coordinator's logic without Ray: registration by report, inventories on a new worker, a
new epoch or a gap, liveness, and routing over what the reports say."""

from __future__ import annotations

from rayk.cache.events import AllBlocksCleared, BlocksStored, KVEventBatch
from rayk.cluster.coordinator import CoordinatorState
from rayk.cluster.routing import WorkerLoad

ROOT = bytes(16)
KEYS = [bytes([i]) * 16 for i in range(1, 5)]


def _batch(seq: int, keys=KEYS) -> KVEventBatch:
    return KVEventBatch(seq, 0.0, (BlocksStored("device", tuple(keys), ROOT),))


def test_an_unknown_worker_is_registered_by_its_first_report_and_asked_for_its_inventory():
    state = CoordinatorState(block_size=16)
    assert state.report("worker-0", 1, [], WorkerLoad(), [], now=0.0) is True
    assert state.workers() == ["worker-0"]
    assert state.report("worker-0", 1, [_batch(0)], WorkerLoad(), [], now=0.1) is False
    assert state.route("r", KEYS, 80).worker_id == "worker-0"


def test_a_gap_in_seq_asks_for_the_inventory_and_the_inventory_replaces_the_entries():
    state = CoordinatorState(block_size=16)
    state.report("worker-0", 1, [], WorkerLoad(), [], now=0.0)
    state.load_inventory("worker-0", 1, -1, {"device": []})
    assert state.report("worker-0", 1, [_batch(0)], WorkerLoad(), [], now=0.1) is False
    assert state.report("worker-0", 1, [_batch(2, KEYS[:1])], WorkerLoad(), [], now=0.2) is True
    state.load_inventory("worker-0", 1, 2, {"device": KEYS[:2]})
    assert state.stats()["directory"]["workers"]["worker-0"] == 2
    assert state.report("worker-0", 1, [_batch(3, [bytes([9]) * 16])], WorkerLoad(), [], now=0.3) is False


def test_a_new_epoch_drops_the_old_incarnations_entries_and_old_reports_are_ignored():
    state = CoordinatorState(block_size=16)
    state.report("worker-0", 1, [], WorkerLoad(), [], now=0.0)
    state.load_inventory("worker-0", 1, 0, {"device": KEYS})
    assert state.report("worker-0", 2, [], WorkerLoad(), [], now=0.1) is True
    assert state.stats()["directory"]["blocks"] == 0
    assert state.report("worker-0", 1, [_batch(1)], WorkerLoad(), [], now=0.2) is False
    state.load_inventory("worker-0", 1, 1, {"device": KEYS})  # an old incarnation's inventory
    assert state.stats()["directory"]["blocks"] == 0


def test_a_silent_worker_leaves_the_directory_and_the_routing_table():
    state = CoordinatorState(block_size=16, liveness_timeout_s=2.0)
    for worker_id in ("worker-0", "worker-1"):
        state.report(worker_id, 1, [], WorkerLoad(), [], now=0.0)
        state.load_inventory(worker_id, 1, -1, {})
    state.report("worker-0", 1, [_batch(0)], WorkerLoad(), [], now=1.0)
    state.report("worker-1", 1, [], WorkerLoad(), [], now=2.5)
    assert state.expire(now=2.9) == []
    assert state.expire(now=3.1) == ["worker-0"]
    assert state.workers() == ["worker-1"]
    assert state.stats()["directory"]["blocks"] == 0
    assert state.route("r", KEYS, 80).worker_id == "worker-1"
    assert state.stats()["liveness"]["dead_workers"] == 1


def test_routing_follows_the_reports_and_completions_feed_the_accuracy():
    state = CoordinatorState(block_size=16)
    for worker_id in ("worker-0", "worker-1"):
        state.report(worker_id, 1, [], WorkerLoad(), [], now=0.0)
        state.load_inventory(worker_id, 1, -1, {})
    state.report("worker-1", 1, [_batch(0)], WorkerLoad(), [], now=0.1)
    decision = state.route("r", KEYS, 80)
    assert decision.worker_id == "worker-1" and decision.predicted_hit_tokens == 64
    state.complete([("r", 64)])
    routing = state.stats()["routing"]
    assert routing["completed"] == 1 and routing["actual_hit_tokens"] == 64


def test_a_cleared_device_tier_ends_the_claims_its_completed_requests_left():
    state = CoordinatorState(block_size=16)
    for worker_id in ("worker-0", "worker-1"):
        state.report(worker_id, 1, [], WorkerLoad(), [], now=0.0)
        state.load_inventory(worker_id, 1, -1, {})
    done = state.route("done", KEYS, 80)
    state.complete([("done", 0)])
    running = state.route("running", [bytes([7]) * 16] * 2, 40, worker=done.worker_id)
    assert state.stats()["routing"]["pending_claims"] == 2
    cleared = KVEventBatch(0, 0.0, (AllBlocksCleared("device"),))
    state.report(done.worker_id, 1, [cleared], WorkerLoad(), [], now=0.2)
    assert state.stats()["routing"]["pending_claims"] == 1, "the running request still computes its blocks"
    assert state.route("again", KEYS, 80).oracle_hit_tokens == 0
    assert running.worker_id == done.worker_id


def test_replica_changes_tell_each_worker_what_gained_or_lost_a_copy_elsewhere():
    state = CoordinatorState(block_size=16)
    for worker_id in ("worker-0", "worker-1"):
        state.report(worker_id, 1, [], WorkerLoad(), [], now=0.0)
        state.load_inventory(worker_id, 1, -1, {})
    state.report("worker-0", 1, [_batch(0)], WorkerLoad(), [], now=0.1)
    generation, reset, gained, lost = state.replica_changes("worker-0", 1, None, now=0.0)
    assert reset and gained == [] and lost == []  # the first answer is the whole (empty) set
    state.report("worker-1", 1, [_batch(0, KEYS[:2])], WorkerLoad(), [], now=0.1)
    generation, reset, gained, lost = state.replica_changes("worker-0", 1, generation, now=1.0)
    assert not reset and sorted(gained) == sorted(KEYS[:2]) and lost == []
    generation, reset, gained, lost = state.replica_changes("worker-0", 1, generation, now=2.0)
    assert (reset, gained, lost) == (False, [], [])  # only changes are sent
    state.remove_worker("worker-1")
    generation, reset, gained, lost = state.replica_changes("worker-0", 1, generation, now=3.0)
    assert not reset and gained == [] and sorted(lost) == sorted(KEYS[:2])
    assert state.replica_changes("worker-9", 1, None) == (None, False, [], [])
    assert state.replica_changes("worker-0", 7, generation) == (None, False, [], [])  # not this incarnation


def test_a_lost_replica_answer_or_a_restarted_coordinator_sends_the_whole_set():
    state = CoordinatorState(block_size=16)
    for worker_id in ("worker-0", "worker-1"):
        state.report(worker_id, 1, [_batch(0, KEYS[:3])], WorkerLoad(), [], now=0.0)
        state.load_inventory(worker_id, 1, 0, {"device": KEYS[:3]})
    first, reset, gained, _ = state.replica_changes("worker-0", 1, None, now=0.0)
    assert reset and sorted(gained) == sorted(KEYS[:3])
    # The worker never applied `first` (its call timed out): the next answer is whole again.
    second, reset, gained, _ = state.replica_changes("worker-0", 1, None, now=1.0)
    assert reset and sorted(gained) == sorted(KEYS[:3]) and second != first
    restarted = CoordinatorState(block_size=16)
    restarted.report("worker-0", 1, [], WorkerLoad(), [], now=0.0)
    restarted.load_inventory("worker-0", 1, 0, {"device": KEYS[:3]})
    _, reset, gained, _ = restarted.replica_changes("worker-0", 1, second, now=0.0)
    assert reset and gained == []  # its old marks are all dropped: nobody else holds them now
