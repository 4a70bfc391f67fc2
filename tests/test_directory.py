"""The prefix directory follows the workers' events, sequences and epochs, and matches exactly."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rayk.cache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch
from rayk.cluster.directory import MANY_HOLDERS, MATCH_TIERS, TIERS, BlocksByTier, PrefixDirectory

ROOT = bytes(16)


def _chain(name: str, length: int) -> list[bytes]:
    return [f"{name}-{i}".encode().ljust(16, b".") for i in range(length)]


def _stored(keys, tier="device", parent=ROOT) -> BlocksStored:
    return BlocksStored(tier, tuple(keys), parent)


def _batch(seq: int, *events) -> KVEventBatch:
    return KVEventBatch(seq, 0.0, tuple(events))


def _by_worker(match: dict[BlocksByTier, list[str]]) -> dict[str, BlocksByTier]:
    return {worker: counts for counts, workers in match.items() for worker in workers}


def _directory(*worker_ids: str) -> PrefixDirectory:
    directory = PrefixDirectory()
    for worker_id in worker_ids:
        directory.register(worker_id, 0)
    return directory


# -- ingest -----------------------------------------------------------------------------------


def test_stored_removed_and_cleared_blocks_are_tracked_per_tier():
    directory = _directory("w0")
    keys = _chain("a", 6)
    assert directory.apply("w0", 0, _batch(0, _stored(keys), _stored(keys[:2], "host"), _stored(keys[:1], "disk")))
    assert directory.blocks_per_tier("w0") == {"device": 6, "host": 2, "disk": 1}
    assert directory.apply("w0", 0, _batch(1, BlocksRemoved("device", tuple(keys[4:])), AllBlocksCleared("disk")))
    assert directory.blocks_per_tier("w0") == {"device": 4, "host": 2, "disk": 0}
    assert directory.num_blocks == 4 and directory.blocks_per_worker() == {"w0": 4}
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(device=4)}
    directory.check_invariants()


def test_an_unknown_tier_or_worker_is_an_error_naming_it():
    directory = _directory("w0")
    with pytest.raises(ValueError, match=r"'gpu'.*'device', 'host', 'disk'|'device', 'host', 'disk'.*'gpu'"):
        directory.apply("w0", 0, _batch(0, _stored(_chain("a", 1), tier="gpu")))
    assert directory.next_seq("w0") == 0, "a rejected batch changes nothing"
    keys = _chain("b", 2)
    with pytest.raises(TypeError, match="got str"):
        directory.apply("w0", 0, _batch(0, _stored(keys), "not an event"))
    assert directory.match(keys) == {} and directory.next_seq("w0") == 0, "no event of a bad batch is applied"
    with pytest.raises(ValueError, match=r"'w9'.*registered: \['w0'\]"):
        directory.apply("w9", 0, _batch(0))
    with pytest.raises(ValueError, match="inventory tiers"):
        directory.load_inventory("w0", 0, -1, {"gpu": []})
    with pytest.raises(ValueError, match="epoch"):
        directory.register("w1", -1)


# -- sequencing and epochs --------------------------------------------------------------------


def test_a_gap_in_seq_asks_for_the_inventory():
    directory = _directory("w0")
    keys = _chain("a", 4)
    assert directory.apply("w0", 0, _batch(0, _stored(keys[:2])))
    assert not directory.apply("w0", 0, _batch(2, _stored(keys)))
    assert directory.blocks_per_worker() == {"w0": 2}, "nothing of a batch after a gap is applied"
    directory.load_inventory("w0", 0, 2, {"device": keys, "host": keys[:1]})
    assert directory.next_seq("w0") == 3
    assert directory.apply("w0", 0, _batch(1, BlocksRemoved("device", tuple(keys)))), "a batch the inventory covers"
    assert directory.apply("w0", 0, _batch(2, BlocksRemoved("device", tuple(keys)))), "is ignored"
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(device=4)}
    assert directory.apply("w0", 0, _batch(3, BlocksRemoved("device", tuple(keys[1:]))))
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(device=1)}
    directory.check_invariants()


def test_a_batch_of_an_old_epoch_is_ignored():
    directory = _directory("w0")
    directory.register("w0", 3)
    assert directory.apply("w0", 2, _batch(0, _stored(_chain("a", 2))))
    assert directory.num_blocks == 0


def test_a_new_epoch_drops_the_old_entries_and_asks_for_the_inventory():
    directory = _directory("w0", "w1")
    keys = _chain("a", 3)
    directory.apply("w0", 0, _batch(0, _stored(keys)))
    directory.apply("w1", 0, _batch(0, _stored(keys)))
    directory.mark_pending("w0", _chain("b", 2), "r0")
    assert not directory.apply("w0", 1, _batch(5, _stored(keys)))
    assert directory.blocks_per_worker() == {"w0": 0, "w1": 3}
    assert directory.match(_chain("b", 2)) == {}, "a restarted worker lost its pending requests"
    assert directory.next_seq("w0") == 0
    directory.load_inventory("w0", 1, 5, {"disk": keys})
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(disk=3), "w1": BlocksByTier(device=3)}
    directory.register("w0", 0)  # a late registration of an older incarnation changes nothing
    assert directory.blocks_per_worker()["w0"] == 3
    directory.check_invariants()


def test_registering_a_new_incarnation_expects_seq_zero():
    directory = _directory("w0")
    directory.apply("w0", 0, _batch(0, _stored(_chain("a", 2))))
    directory.register("w0", 1)
    assert directory.num_blocks == 0 and directory.next_seq("w0") == 0
    assert directory.apply("w0", 1, _batch(0, _stored(_chain("a", 1))))


def test_a_removed_worker_is_forgotten_and_its_slot_reused():
    directory = _directory("w0", "w1")
    keys = _chain("a", 3)
    for worker_id in ("w0", "w1"):
        directory.apply(worker_id, 0, _batch(0, _stored(keys)))
    directory.remove("w0")
    assert directory.workers() == ["w1"]
    assert _by_worker(directory.match(keys)) == {"w1": BlocksByTier(device=3)}
    directory.register("w2", 0)  # takes w0's slot: its stale candidates must not match
    assert _by_worker(directory.match(keys)) == {"w1": BlocksByTier(device=3)}
    directory.check_invariants()


# -- matching ---------------------------------------------------------------------------------


def test_match_walks_the_chain_and_counts_each_block_in_its_best_tier():
    directory = _directory("w0", "w1")
    keys = _chain("a", 8)
    directory.apply("w0", 0, _batch(0, _stored(keys[:3]), _stored(keys[2:6], "host", keys[1]), _stored(keys[6:], "disk", keys[5])))
    directory.apply("w1", 0, _batch(0, _stored(keys[:2]), _stored(keys[3:], parent=keys[2])))  # a hole at 2
    held = _by_worker(directory.match(keys))
    assert held == {"w0": BlocksByTier(device=3, host=3, disk=2), "w1": BlocksByTier(device=2)}
    assert held["w0"].num_blocks == 8
    assert directory.match(keys[1:]) == {}, "a match starts at a chain's first block"
    assert directory.match(_chain("b", 3)) == {}


def test_workers_with_the_same_hit_share_one_entry():
    directory = _directory("w0", "w1", "w2")
    keys = _chain("a", 4)
    for worker_id in ("w0", "w1"):
        directory.apply(worker_id, 0, _batch(0, _stored(keys)))
    directory.apply("w2", 0, _batch(0, _stored(keys[:2])))
    assert directory.match(keys) == {BlocksByTier(device=4): ["w0", "w1"], BlocksByTier(device=2): ["w2"]}


def test_a_prefix_on_many_workers_matches_exactly_through_the_shared_masks():
    workers = [f"w{i}" for i in range(2 * MANY_HOLDERS + 2)]
    directory = _directory(*workers)
    system, expected = _chain("system", 4), {}
    for i, worker_id in enumerate(workers):
        own = _chain(f"user{i}", i)
        events = [_stored(system, "host" if i % 3 == 0 else "device"), _stored(own, parent=system[-1])]
        directory.apply(worker_id, 0, _batch(0, *events))
        expected[worker_id] = (system, own, i % 3 == 0)
    for i, worker_id in enumerate(workers):
        system_tier_host = expected[worker_id][2]
        held = _by_worker(directory.match(system + _chain(f"user{i}", len(workers))))
        for other, (_, own, on_host) in expected.items():
            mine = len(own) if other == worker_id else 0
            blocks = BlocksByTier(device=(0 if on_host else 4) + mine, host=4 if on_host else 0)
            assert held[other] == blocks, (worker_id, other)
        assert system_tier_host == (i % 3 == 0)
    # Ingest keeps the cached masks exact: the system prompt leaves half of the workers.
    for worker_id in workers[::2]:
        tier = "host" if int(worker_id[1:]) % 3 == 0 else "device"
        directory.apply(worker_id, 0, _batch(1, BlocksRemoved(tier, tuple(system[2:]))))
    directory.check_invariants()
    held = _by_worker(directory.match(system))
    assert sorted(w for w, counts in held.items() if counts.num_blocks == 4) == sorted(workers[1::2])
    assert sorted(w for w, counts in held.items() if counts.num_blocks == 2) == sorted(workers[::2])


# -- pending ----------------------------------------------------------------------------------


def test_pending_claims_match_like_device_blocks_until_ended_by_their_owner():
    directory = _directory("w0", "w1")
    keys = _chain("a", 4)
    directory.apply("w0", 0, _batch(0, _stored(keys[:2], "host")))
    directory.mark_pending("w0", keys[2:], "r0")
    directory.mark_pending("w1", keys, "r1")
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(host=2, pending=2), "w1": BlocksByTier(pending=4)}
    directory.mark_pending("w1", keys[:2], "r2")  # the latest claim owns these two
    directory.end_pending("w1", keys, "r1")
    assert _by_worker(directory.match(keys))["w1"] == BlocksByTier(pending=2)
    directory.end_pending("w1", keys, "r2")
    assert "w1" not in _by_worker(directory.match(keys))
    directory.check_invariants()


def test_storing_a_key_ends_its_pending_claim():
    directory = _directory("w0")
    keys = _chain("a", 3)
    directory.mark_pending("w0", keys, "r0")
    directory.apply("w0", 0, _batch(0, _stored(keys[:2])))
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(device=2, pending=1)}
    directory.apply("w0", 0, _batch(1, BlocksRemoved("device", tuple(keys[:2]))))
    assert directory.match(keys) == {}, "a stored key is no longer pending once removed"
    directory.mark_pending("ghost", keys, "r1")  # a removed worker: ignored
    directory.end_pending("ghost", keys, "r1")


def test_prefixes_held_count_noted_first_keys_in_device_or_pending():
    directory = _directory("w0", "w1")
    a, b, c = _chain("a", 3), _chain("b", 2), _chain("c", 2)
    directory.apply("w0", 0, _batch(0, _stored(a), _stored(b)))
    directory.note_prefix(a[0])  # noted after it was stored
    directory.note_prefix(b[0])
    directory.note_prefix(c[0])
    directory.mark_pending("w1", c, "r0")
    assert directory.prefixes_held(["w0", "w1"]) == [2, 1]
    directory.apply("w0", 0, _batch(1, BlocksRemoved("device", (b[0],)), _stored(a[:1], "host")))
    assert directory.prefixes_held(["w0", "w1"]) == [1, 1], "only device and pending count"
    directory.apply("w1", 0, _batch(0, _stored(c)))
    directory.apply("w1", 0, _batch(1, AllBlocksCleared("device")))
    assert directory.prefixes_held(["w0", "w1"]) == [1, 0]
    directory.load_inventory("w0", 0, 5, {"host": a})
    assert directory.prefixes_held(["w0"]) == [0]
    directory.check_invariants()


def test_stale_first_key_candidates_are_swept_as_the_index_grows():
    directory = _directory("w0")
    for seq in range(3000):
        keys = _chain(f"c{seq}", 2)
        directory.apply("w0", 0, _batch(2 * seq, _stored(keys)))
        directory.apply("w0", 0, _batch(2 * seq + 1, BlocksRemoved("device", tuple(keys))))
    assert len(directory._heads) <= 2 * 4096
    keys = _chain("kept", 2)
    directory.apply("w0", 0, _batch(6000, _stored(keys)))
    assert _by_worker(directory.match(keys)) == {"w0": BlocksByTier(device=2)}


# -- against a trivial model ------------------------------------------------------------------

CHAINS = [_chain("a", 6), _chain("a", 3) + _chain("a-branch", 3), _chain("b", 5)]
WORKERS = [f"w{i}" for i in range(MANY_HOLDERS + 2)]


def _model_match(model: dict[str, dict[str, set]], keys: list[bytes]) -> dict[str, BlocksByTier]:
    found = {}
    for worker_id, containers in model.items():
        counts = [0] * len(MATCH_TIERS)
        for key in keys:
            best = next((i for i, tier in enumerate(MATCH_TIERS) if key in containers[tier]), None)
            if best is None:
                break
            counts[best] += 1
        if sum(counts):
            found[worker_id] = BlocksByTier(*counts)
    return found


class DirectoryAgainstModel(RuleBasedStateMachine):
    """Any sequence of events, gaps, epochs, inventories, claims and removals leaves the directory
    matching a dict of (worker, container) -> set of keys."""

    @initialize()
    def start(self):
        self.directory = PrefixDirectory(shared_capacity=8)
        self.model: dict[str, dict[str, set]] = {}
        self.owners: dict[str, dict[bytes, str]] = {}
        self.epochs: dict[str, int] = {}
        self.seqs: dict[str, int] = {}
        for worker in WORKERS:
            self.register(worker)

    def _empty(self, worker_id: str) -> None:
        self.model[worker_id] = {tier: set() for tier in MATCH_TIERS}
        self.owners[worker_id] = {}

    @rule(worker=st.sampled_from(WORKERS))
    def register(self, worker):
        self.epochs[worker] = self.epochs.get(worker, -1) + 1
        self.seqs[worker] = 0
        self.directory.register(worker, self.epochs[worker])
        self._empty(worker)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        worker = data.draw(st.sampled_from(sorted(self.model)))
        self.directory.remove(worker)
        del self.model[worker], self.owners[worker], self.seqs[worker]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), chain=st.sampled_from(CHAINS), tier=st.sampled_from(TIERS), kind=st.sampled_from(["store", "remove", "clear"]))
    def apply(self, data, chain, tier, kind):
        worker = data.draw(st.sampled_from(sorted(self.model)))
        start = data.draw(st.integers(0, len(chain) - 1))
        end = data.draw(st.integers(start + 1, len(chain)))
        keys = chain[start:end]
        if kind == "store":
            self._store(worker, keys, tier, chain[start - 1] if start else ROOT)
            return
        if kind == "remove":
            event = BlocksRemoved(tier, tuple(keys))
            self.model[worker][tier].difference_update(keys)
        else:
            event = AllBlocksCleared(tier)
            self.model[worker][tier].clear()
        assert self.directory.apply(worker, self.epochs[worker], _batch(self.seqs[worker], event))
        self.seqs[worker] += 1

    @rule(chain=st.sampled_from(CHAINS), length=st.integers(1, 6), tier=st.sampled_from(TIERS))
    def store_on_every_worker(self, chain, length, tier):
        """A prefix on more than MANY_HOLDERS workers: matches go through the shared masks."""
        for worker in sorted(self.model):
            self._store(worker, chain[:length], tier, ROOT)

    def _store(self, worker: str, keys: list[bytes], tier: str, parent: bytes) -> None:
        self.model[worker][tier].update(keys)
        for key in keys:
            if self.owners[worker].pop(key, None) is not None:
                self.model[worker]["pending"].discard(key)
        assert self.directory.apply(worker, self.epochs[worker], _batch(self.seqs[worker], _stored(keys, tier, parent)))
        self.seqs[worker] += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def lose_a_batch_then_load_the_inventory(self, data):
        worker = data.draw(st.sampled_from(sorted(self.model)))
        assert not self.directory.apply(worker, self.epochs[worker], _batch(self.seqs[worker] + 1))
        inventory = {tier: data.draw(st.sets(st.sampled_from([k for c in CHAINS for k in c]))) for tier in TIERS}
        self.directory.load_inventory(worker, self.epochs[worker], self.seqs[worker] + 1, {t: list(k) for t, k in inventory.items()})
        self.seqs[worker] += 2
        for tier, keys in inventory.items():
            self.model[worker][tier] = set(keys)
            for key in keys:
                if self.owners[worker].pop(key, None) is not None:
                    self.model[worker]["pending"].discard(key)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), chain=st.sampled_from(CHAINS), owner=st.sampled_from(["r0", "r1"]), end=st.booleans())
    def claim(self, data, chain, owner, end):
        worker = data.draw(st.sampled_from(sorted(self.model)))
        start = data.draw(st.integers(0, len(chain) - 1))
        keys = chain[start:]
        if end:
            self.directory.end_pending(worker, keys, owner)
            for key in keys:
                if self.owners[worker].get(key) == owner:
                    del self.owners[worker][key]
                    self.model[worker]["pending"].discard(key)
        else:
            self.directory.mark_pending(worker, keys, owner)
            self.owners[worker].update(dict.fromkeys(keys, owner))
            self.model[worker]["pending"].update(keys)

    @rule(chain=st.sampled_from(CHAINS))
    def note_prefix(self, chain):
        """The router notes a request's first key, whether or not workers hold it already."""
        self.directory.note_prefix(chain[0])

    @invariant()
    def matches_agree(self):
        if not hasattr(self, "directory"):
            return
        for chain in CHAINS:
            assert _by_worker(self.directory.match(chain)) == _model_match(self.model, chain)
        self.directory.check_invariants()

    @invariant()
    def sizes_agree(self):
        if not hasattr(self, "directory"):
            return
        stored = {worker: set().union(*(c[tier] for tier in TIERS)) for worker, c in self.model.items()}
        assert self.directory.blocks_per_worker() == {worker: len(keys) for worker, keys in stored.items()}
        assert self.directory.num_blocks == len(set().union(*stored.values()))


TestDirectoryAgainstModel = DirectoryAgainstModel.TestCase
TestDirectoryAgainstModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
