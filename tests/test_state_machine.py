"""A hypothesis state machine over two engines' pools and tiers (device, host, disk) and a prefix
directory fed by their event batches, in one process (no Ray).

Rules interleave at random: serve a request (allocate, hit, free), abort one midway, evict,
offload, prefetch (onload), pin and unpin, pull (export from one engine, decode with the block
codec and stage on the other, as ``PeerPuller`` does), and faults (a damaged pull payload, a
damaged or truncated disk file). After every step:

- every cache passes ``check_invariants``, and idle it has no device block in use but the pinned ones;
- the directory passes its own ``check_invariants`` and mirrors each engine's inventory, tier by
  tier (it learns only from the event batches);
- a served request's greedy tokens are the same as the first time that prompt was served,
  whatever tier (or peer) its prefix came from.
"""

from __future__ import annotations

import functools
import shutil
from collections import Counter
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import rayk
from rayk.cache import block_codec
from rayk.cache.block_codec import BlockBatchError
from rayk.cluster.directory import PrefixDirectory
from tests.conftest import BLOCK_SIZE, random_prompts

NAMES = ("a", "b")
PREFIXES = random_prompts([2 * BLOCK_SIZE, 3 * BLOCK_SIZE, 4 * BLOCK_SIZE], seed=11)
SUFFIXES = random_prompts([1, 5, BLOCK_SIZE, BLOCK_SIZE + 3, 2 * BLOCK_SIZE + 1], seed=12)
MAX_TOKENS = 3
RULES_RUN: Counter[str] = Counter()


def counted(rule_body):
    """Tallies a rule's runs in ``RULES_RUN``, so the test can check every rule was exercised."""

    @functools.wraps(rule_body)
    def run(self, *args, **kwargs):
        RULES_RUN[rule_body.__name__] += 1
        return rule_body(self, *args, **kwargs)

    return run


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, tmp_path_factory):
    """Two engines on the same model, small pools so that serving evicts and demotes."""
    made = {}
    for name in NAMES:
        disk = tmp_path_factory.mktemp(f"disk-{name}")
        made[name] = rayk.LLM(
            tiny_llama_dir, device="cpu", block_size=BLOCK_SIZE, num_device_blocks=24, host_blocks=12, disk_dir=str(disk), max_model_len=128
        )
    yield made
    for llm in made.values():
        llm.engine.close()


class CacheMachine(RuleBasedStateMachine):
    llms: ClassVar[dict[str, rayk.LLM]] = {}
    _subscribed: ClassVar[dict] = {}  # engine name -> the subscriber feeding the current example's directory

    @initialize()
    def start_empty(self):
        self.directory = PrefixDirectory()
        self.reference: dict[tuple[int, int], list[int]] = {}
        self.pinned: dict[str, set[bytes]] = {name: set() for name in NAMES}
        self.epoch = getattr(CacheMachine, "_epoch", 0) + 1
        CacheMachine._epoch = self.epoch  # a new incarnation for every example: old batches never apply
        for name, llm in self.llms.items():
            engine = llm.engine
            engine.memory.unpin([k for k in list(engine.pool.pinned)])
            engine.memory.clear()
            engine.publish_events()
            self.directory.register(name, self.epoch)
            seq, inventory = engine.inventory()
            self.directory.load_inventory(name, self.epoch, seq, inventory)
            old = CacheMachine._subscribed.pop(name, None)  # the previous example's directory
            if old is not None:
                engine.unsubscribe(old)
            CacheMachine._subscribed[name] = self._subscriber(name)
            engine.subscribe(CacheMachine._subscribed[name])

    def _subscriber(self, name: str):
        def apply(batch):
            assert self.directory.apply(name, self.epoch, batch), f"the directory saw a gap in {name}'s batches"

        return apply

    def _prompt(self, prefix: int, suffix: int) -> list[int]:
        return PREFIXES[prefix] + SUFFIXES[suffix]

    def _keys(self, name: str, prefix: int, suffix: int) -> list[bytes]:
        return self.llms[name].block_hashes(self._prompt(prefix, suffix))

    def _check_tokens(self, prefix: int, suffix: int, token_ids: list[int]) -> None:
        expected = self.reference.setdefault((prefix, suffix), token_ids)
        assert token_ids == expected, f"prompt {(prefix, suffix)} gave {token_ids}, first {expected}"

    def _run(self, name: str, prefix: int, suffix: int, remote=None) -> None:
        engine = self.llms[name].engine
        params = rayk.SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        request_id = engine.add_request(self._prompt(prefix, suffix), params, remote=remote)
        output = None
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.finished and delta.output.request_id == request_id:
                    output = delta.output
        self._check_tokens(prefix, suffix, output.token_ids)

    # -- rules ------------------------------------------------------------------------------------

    prefixes = st.integers(0, len(PREFIXES) - 1)
    suffixes = st.integers(0, len(SUFFIXES) - 1)
    names = st.sampled_from(NAMES)

    @rule(name=names, prefix=prefixes, suffix=suffixes)
    @counted
    def serve(self, name, prefix, suffix):
        self._run(name, prefix, suffix)

    @rule(name=names, prefix=prefixes, suffix=suffixes, steps=st.integers(0, 2))
    @counted
    def abort_midway(self, name, prefix, suffix, steps):
        engine = self.llms[name].engine
        request_id = engine.add_request(self._prompt(prefix, suffix), rayk.SamplingParams(temperature=0, max_tokens=8))
        for _ in range(steps):
            engine.step()
        engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        engine.publish_events()

    @rule(name=names, prefix=prefixes, suffix=suffixes)
    @counted
    def evict(self, name, prefix, suffix):
        self.llms[name].engine.memory.evict(self._keys(name, prefix, suffix))
        self.llms[name].engine.publish_events()

    @rule(name=names, prefix=prefixes, suffix=suffixes, tier=st.sampled_from(["host", "disk"]))
    @counted
    def offload(self, name, prefix, suffix, tier):
        self.llms[name].engine.memory.offload(self._keys(name, prefix, suffix), tier)
        self.llms[name].engine.publish_events()

    @rule(name=names, prefix=prefixes, suffix=suffixes, tier=st.sampled_from(["device", "host"]))
    @counted
    def prefetch(self, name, prefix, suffix, tier):
        self.llms[name].engine.memory.prefetch(self._keys(name, prefix, suffix), tier)
        self.llms[name].engine.publish_events()

    @rule(name=names, prefix=prefixes, suffix=suffixes)
    @counted
    def pin(self, name, prefix, suffix):
        engine = self.llms[name].engine
        keys = self._keys(name, prefix, suffix)
        before = set(engine.pool.pinned)
        try:
            engine.memory.pin(keys)
        except ValueError as error:  # past the budget: refused whole
            assert "would leave fewer than" in str(error)
            assert set(engine.pool.pinned) == before
        engine.publish_events()
        self.pinned[name] = set(engine.pool.pinned)

    @rule(name=names)
    @counted
    def unpin_all(self, name):
        engine = self.llms[name].engine
        engine.memory.unpin(list(engine.pool.pinned))
        self.pinned[name] = set()

    @rule(source=names, prefix=prefixes, suffix=suffixes, damage=st.sampled_from([None, "flip", "truncate"]))
    @counted
    def pull(self, source, prefix, suffix, damage):
        target = NAMES[1 - NAMES.index(source)]
        engine = self.llms[target].engine
        keys = self._keys(source, prefix, suffix)
        buffer, held = self.llms[source].engine.cache.chain.export(keys)
        if held == 0:  # the source computes the prompt first, so that every pull has blocks to move
            self._run(source, prefix, suffix)
            buffer, held = self.llms[source].engine.cache.chain.export(keys)
            if held == 0:
                return
        RULES_RUN[f"pull with {damage or 'no'} damage"] += 1
        payload = bytearray(buffer.tobytes())
        if damage == "flip":
            payload[-1] ^= 0xFF  # inside the last block's payload: its checksum fails
        elif damage == "truncate":
            del payload[len(payload) // 2 :]
        try:
            decoded = block_codec.decode(bytes(payload), engine.fingerprint, engine.kv_cache.layout)
        except BlockBatchError:
            assert damage == "truncate"
            decoded = None
        if decoded is not None:
            assert decoded.num_rejected == (1 if damage == "flip" else 0)
            assert len(decoded.records) == held - decoded.num_rejected
        self._run(target, prefix, suffix, remote=decoded)

    @rule(name=names, how=st.sampled_from(["flip", "truncate"]), pick=st.integers(0, 10**6))
    @counted
    def damage_disk_file(self, name, how, pick):
        disk = self.llms[name].engine.cache.disk
        files = sorted(p for p in disk.directory.rglob("*") if p.is_file() and p.stat().st_size > 0) if disk is not None else []
        if not files:
            return
        path = files[pick % len(files)]
        data = bytearray(path.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 2 :]
        path.write_bytes(bytes(data))

    @rule(name=names)
    @counted
    def failing_disk_write(self, name):
        """The disk directory vanishes under the tier: it is made anew by the next write, and
        serving goes on."""
        disk = self.llms[name].engine.cache.disk
        if disk is not None:
            shutil.rmtree(disk.directory, ignore_errors=True)

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def caches_are_consistent_and_idle(self):
        for name, llm in self.llms.items():
            engine = llm.engine
            engine.kv_cache_manager.check_invariants()
            assert not engine.has_unfinished_requests()
            # Idle, a device block is in use only while pinned.
            used, pinned = engine.pool.num_used_blocks, len(engine.pool.pinned)
            assert used == pinned, f"{name}: {used} device blocks in use while idle, {pinned} pinned"
            assert set(engine.pool.pinned) == self.pinned[name]

    @invariant()
    def the_directory_mirrors_every_inventory(self):
        self.directory.check_invariants()
        for name, llm in self.llms.items():
            llm.engine.publish_events()
            _, inventory = llm.engine.inventory()
            held = {tier: len(set(keys)) for tier, keys in inventory.items()}
            seen = {tier: n for tier, n in self.directory.blocks_per_tier(name).items() if tier in held}
            assert seen == held, f"{name}: directory {seen}, inventory {held}"
            assert self.directory.stored_keys(name) == set().union(*map(set, inventory.values()))


def test_random_interleavings_keep_every_invariant(engines):
    CacheMachine.llms = engines
    RULES_RUN.clear()
    run_state_machine_as_test(
        CacheMachine,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)),
    )
    rules = {name for name, value in vars(CacheMachine).items() if hasattr(value, "hypothesis_stateful_rule")}
    rules |= {f"pull with {damage} damage" for damage in ("no", "flip", "truncate")}
    assert set(RULES_RUN) == rules, f"rules never run: {rules - set(RULES_RUN)}"
    assert sum(RULES_RUN.values()) >= 400, RULES_RUN
