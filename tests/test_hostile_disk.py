"""A disk tier or snapshot directory that others can write to (issue 15): planted links, FIFOs,
directories, foreign files, poisoned and oversized headers. rayk never writes, reads or deletes
through a link, never hangs, deletes only what it wrote, skips odd entries (counted), and never
serves a block holding non-finite values."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import time

import msgpack
import pytest
import torch

import rayk
from rayk.cache import disk_tier
from rayk.cache.block_codec import MAGIC, PREFIX_BYTES, BlockBatchError, decode, encode, read_header
from rayk.cache.block_pool import BlockRecord
from rayk.cache.disk_tier import SEGMENT_DIR_PREFIX, SUFFIX, DiskTier, segment_dir_name
from rayk.cache.paged_kv import KVLayout
from rayk.cache.policies import make_policy
from rayk.hashing import BlockHasher, token_bytes
from tests.conftest import BLOCK_SIZE, chain_records, random_prompts

LAYOUT = KVLayout(1, 4, 1, 8, torch.float32)
FINGERPRINT = bytes(32)
SEGMENT = "seg-" + "ab" * 12 + SUFFIX  # named as rayk names its segments
TEMPORARY = "." + "cd" * 12 + ".tmp"  # named as rayk names its temporary files


def _tier(directory, **options) -> DiskTier:
    return DiskTier(directory, LAYOUT, FINGERPRINT, 1 << 20, make_policy("lru"), **options)


def _segments(directory):
    """Where ``_tier(directory)`` keeps its segments."""
    return directory / segment_dir_name(FINGERPRINT, LAYOUT)


class _Hung(BaseException):
    """Raised into a block that ran past its deadline (not an OSError: rayk must not catch it)."""


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fails the test (instead of hanging it) if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise _Hung(f"still running after {seconds} s: rayk blocked on a planted file")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _outside(tmp_path):
    """A file outside the cache directory that a planted link points at."""
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    return target


def test_a_planted_link_is_never_written_through_renamed_over_or_deleted(tmp_path, monkeypatch):
    target = _outside(tmp_path)
    cache = _segments(tmp_path / "kv")
    cache.mkdir(mode=0o700, parents=True)
    # A link at the name the writer will pick for its temporary file: the exclusive create refuses it.
    monkeypatch.setattr(disk_tier.secrets, "token_hex", lambda n: "cd" * 12)
    (cache / TEMPORARY).symlink_to(target)
    records, blocks = chain_records(2)
    tier = _tier(tmp_path / "kv")
    tier.store(records[:1], blocks[:, :, :1])
    assert tier.flush()
    assert tier.num_write_errors == 1 and len(tier) == 0
    # A link at the segment's own name: the rename replaces the link, never its target.
    (cache / TEMPORARY).unlink()
    (cache / ("seg-" + "cd" * 12 + SUFFIX)).symlink_to(target)
    tier.store(records[:1], blocks[:, :, :1])
    assert tier.flush() and len(tier) == 1
    assert not (cache / ("seg-" + "cd" * 12 + SUFFIX)).is_symlink()
    tier.clear()
    tier.close()
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("plant", ["link", "file", "writable by others", "another user's"])
def test_a_segment_dir_that_is_not_rayks_is_never_used(tmp_path, plant):
    """Planted where rayk keeps its segments: nothing is read, written or deleted through it; the
    tier holds nothing, says why in ``health()``, and the engine above it goes on."""
    target = _outside(tmp_path)
    cache = _segments(tmp_path / "kv")
    cache.parent.mkdir()
    if plant == "link":
        cache.symlink_to(target.parent)
    elif plant == "file":
        cache.write_bytes(b"not a directory")
    else:
        cache.mkdir()
        if plant == "writable by others":
            cache.chmod(0o777)
        elif os.geteuid() == 0:
            os.chown(cache, 12345, 12345)
        else:
            pytest.skip("giving a directory to another user needs root")
    before = sorted(target.parent.iterdir())
    records, blocks = chain_records(2)
    tier = _tier(tmp_path / "kv")
    tier.store(records, blocks)
    assert tier.flush() and len(tier) == 0 and tier.health()["dropped_blocks"] == 2
    health = tier.health()
    assert health["degraded"] and str(cache) in health["degraded_reason"] and "holds nothing" in health["degraded_reason"]
    tier.close()
    assert sorted(target.parent.iterdir()) == before and target.read_bytes() == b"precious"


def test_links_at_every_name_rayk_reads_or_deletes_are_skipped_and_left(tmp_path):
    root, cache = tmp_path / "kv", _segments(tmp_path / "kv")
    records, blocks = chain_records(1)
    writer = _tier(root)
    writer.store(records, blocks)
    writer.close()
    [segment] = cache.glob("*" + SUFFIX)
    outside = tmp_path / "outside"
    outside.mkdir()
    real = outside / segment.name
    segment.rename(real)  # a valid segment, reachable only through a link
    stale = outside / "stale.tmp"
    stale.write_bytes(MAGIC + b"half written")
    os.utime(stale, (0, 0))
    for name, target in [(segment.name, real), (TEMPORARY, stale), ("seg-" + "ee" * 12 + SUFFIX, outside / "missing")]:
        (cache / name).symlink_to(target)
    for options, skipped in (({}, 3), ({"read_only": True}, 2)):  # a reader never looks at temporaries
        tier = _tier(root, **options)
        assert len(tier) == 0 and tier.num_skipped == skipped and tier.health()["skipped_entries"] == skipped
        tier.close()
    assert real.exists() and stale.exists() and all((cache / n).is_symlink() for n in (segment.name, TEMPORARY))


def test_odd_entries_named_like_cache_files_are_skipped_and_counted(tmp_path):
    root, cache = tmp_path / "kv", _segments(tmp_path / "kv")
    records, blocks = chain_records(2)
    writer = _tier(root)
    writer.store(records, blocks)
    writer.close()
    (cache / SEGMENT).mkdir()
    (cache / TEMPORARY).mkdir()
    os.utime(cache / TEMPORARY, (0, 0))
    os.mkfifo(cache / ("seg-" + "ff" * 12 + SUFFIX))
    os.mkfifo(cache / ("." + "ff" * 12 + ".tmp"))
    os.utime(cache / ("." + "ff" * 12 + ".tmp"), (0, 0))
    for options, skipped in (({}, 4), ({"read_only": True}, 2)):  # a reader never looks at temporaries
        with _deadline(10):
            tier = _tier(root, **options)
        assert tier.num_skipped == skipped and len(tier) == 2
        assert torch.equal(tier.read(records[1].key, records[1].parent, records[1].tokens), blocks[:, :, 1:2])
        tier.close()
    assert (cache / SEGMENT).is_dir() and (cache / TEMPORARY).is_dir()


def test_a_file_vanishing_while_the_tier_starts_is_skipped(tmp_path, monkeypatch):
    records, blocks = chain_records(1)
    writer = _tier(tmp_path / "kv")
    writer.store(records, blocks)
    writer.close()
    doomed = _segments(tmp_path / "kv") / SEGMENT
    doomed.write_bytes(b"another engine is about to remove this")
    listdir = os.listdir

    def list_then_lose(path):  # another engine deletes a file between our listing and our open
        names = listdir(path)
        doomed.unlink()
        return names

    monkeypatch.setattr(disk_tier.os, "listdir", list_then_lose)
    tier = _tier(tmp_path / "kv")
    assert tier.num_skipped == 1 and len(tier) == 1
    tier.close()


def test_a_fifo_swapped_in_during_a_run_is_a_miss_not_a_hang(tmp_path):
    records, blocks = chain_records(2)
    tier = _tier(tmp_path / "kv")
    tier.store(records, blocks)
    assert tier.flush()
    [segment] = tier.segment_dir.glob("*" + SUFFIX)
    segment.unlink()
    os.mkfifo(segment)
    with _deadline(10):
        assert tier.read(records[0].key, records[0].parent, records[0].tokens) is None
    assert tier.num_rejected == 1 and len(tier) == 0
    tier.close()


def test_rayk_deletes_only_temporary_files_it_wrote(tmp_path):
    root, cache = tmp_path / "kv", _segments(tmp_path / "kv")
    records, blocks = chain_records(1)
    tier = _tier(root)
    tier.store(records, blocks)
    tier.close()
    stale_ours = cache / ("." + "22" * 12 + ".tmp")
    stale_ours.write_bytes(MAGIC + b"cut short by a crash")
    fresh_ours = cache / ("." + "55" * 12 + ".tmp")
    fresh_ours.write_bytes(MAGIC + b"a live writer's")
    foreign = {
        "notes.tmp": b"my notes",
        ".notes.tmp": b"hidden notes",
        "." + "33" * 12 + ".tmp": b"not a block batch",
        ".report.tmp": MAGIC + b"named unlike ours",
    }
    for name, data in foreign.items():
        (cache / name).write_bytes(data)
    for path in [stale_ours, *(cache / name for name in foreign)]:
        os.utime(path, (0, 0))  # all long stale
    # At the top of disk_dir nothing is rayk's, not even files named and made as rayk makes them.
    [segment] = cache.glob("*" + SUFFIX)
    users = {"notes.tmp": b"my notes", "backup.kvb": b"my backup", segment.name: segment.read_bytes(), stale_ours.name: stale_ours.read_bytes()}
    for name, data in users.items():
        (root / name).write_bytes(data)
        os.utime(root / name, (0, 0))
    tier = _tier(root)
    assert len(tier) == 1
    tier.clear()
    tier.close()
    assert not stale_ours.exists() and fresh_ours.exists()
    assert {name: (cache / name).read_bytes() for name in foreign} == foreign
    assert {name: (root / name).read_bytes() for name in users} == users


def test_a_block_holding_non_finite_values_is_never_served(tmp_path):
    records, blocks = chain_records(3)
    blocks[:, :, 1, 2, 0, 5] = float("nan")
    blocks[:, :, 2, 0, 0, 0] = float("inf")
    tier = _tier(tmp_path)
    tier.store(records, blocks)  # the checksums are computed over the poisoned values: they pass
    assert tier.flush()
    assert tier.read(records[1].key, records[1].parent, records[1].tokens) is None
    assert tier.num_rejected == 1 and "non-finite" in tier.health()["degraded_reason"]
    tier.close()

    decoded = decode(encode(records, blocks, FINGERPRINT, LAYOUT), FINGERPRINT, LAYOUT)  # a peer's or a snapshot's batch
    assert [r.key for r in decoded.records] == [records[0].key] and decoded.num_rejected == 2
    assert torch.equal(decoded.blocks, blocks[:, :, :1])
    int8 = decode(encode(records, blocks, FINGERPRINT, LAYOUT, "int8"), FINGERPRINT, LAYOUT)
    assert [r.key for r in int8.records] == [records[0].key] and int8.num_rejected == 2


def _header_bytes(**changes) -> bytes:
    records, blocks = chain_records(1)
    buffer = bytes(encode(records, blocks, FINGERPRINT, LAYOUT))
    length = int.from_bytes(buffer[len(MAGIC) : PREFIX_BYTES], "little")
    header = msgpack.unpackb(buffer[PREFIX_BYTES : PREFIX_BYTES + length])
    entry = header["blocks"][0]
    for index, value in changes.items():
        entry[int(index[1:])] = value
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(packed).to_bytes(4, "little") + packed + buffer[PREFIX_BYTES + length :]


@pytest.mark.parametrize(
    "changes",
    [
        {"f3": list(range(10**6))},  # a million token ids
        {"f1": {"a": 1}},  # a map as parent
        {"f2": "3"},  # a string depth
        {"f2": True},  # a bool depth
        {"f2": -1},
        {"f3": [1, 2, 3, 2**40]},  # a token id that does not fit
        {"f4": b"short"},
    ],
)
def test_a_header_with_loose_types_is_refused(changes):
    with pytest.raises(BlockBatchError, match=r"blocks\[0\]|header length"):
        read_header(_header_bytes(**changes), FINGERPRINT, LAYOUT)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_a_sparse_file_claiming_a_huge_header_is_refused_in_bounded_time_and_memory(tmp_path):
    cache = _segments(tmp_path / "kv")
    cache.mkdir(mode=0o700, parents=True)
    bomb = cache / SEGMENT
    with bomb.open("wb") as f:
        f.write(MAGIC + (0xFFFFFFFF).to_bytes(4, "little"))  # a 4 GiB header
        f.truncate(5 << 30)  # sparse: 5 GiB claimed, a few KiB on disk
    before, started = _max_rss_bytes(), time.monotonic()
    for options in ({"read_only": True}, {}):
        tier = _tier(tmp_path / "kv", **options)
        assert len(tier) == 0
        tier.close()
    assert time.monotonic() - started < 2.0
    assert _max_rss_bytes() - before < 64 << 20
    assert not bomb.exists()  # rayk's name and magic, damaged: the writable tier deleted it


def test_a_dead_disk_logs_one_traceback_and_reports_degraded(tmp_path, caplog):
    cache = tmp_path / "kv"
    records, blocks = chain_records(4)
    tier = _tier(cache)
    shutil.rmtree(cache)
    cache.write_text("")  # a file where the directory was: every write now fails
    with caplog.at_level(logging.DEBUG, logger="rayk.cache.disk_tier"):
        for i in range(4):
            tier.store(records[i : i + 1], blocks[:, :, i : i + 1])
            assert tier.flush()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert tier.num_write_errors == 4 and len(errors) == 1 and errors[0].exc_info is not None
    assert tier.health()["degraded"] and "write failed" in tier.health()["degraded_reason"]
    cache.unlink()  # the disk is back (the next write makes the directory anew)
    tier.store(records[:1], blocks[:, :, :1])
    assert tier.flush() and len(tier) == 1 and not tier.health()["degraded"]
    tier.close()


def _hashed_chain(hasher: BlockHasher, num_blocks: int):
    """``chain_records``' blocks under the keys ``hasher`` gives their tokens."""
    records, blocks = chain_records(num_blocks)
    keys = hasher.hash_blocks(range(4 * num_blocks))
    parents = [hasher.root(), *keys[:-1]]
    return [BlockRecord(r.block, k, p, r.depth, r.tokens) for r, k, p in zip(records, keys, parents)], blocks


def test_a_block_filed_under_a_key_its_tokens_do_not_hash_to_is_refused(tmp_path):
    hasher = BlockHasher(FINGERPRINT, LAYOUT.block_size)
    records, blocks = _hashed_chain(hasher, 2)
    honest, forged = tmp_path / "honest", tmp_path / "forged"
    for directory, chain in ((honest, records), (forged, [records[0], BlockRecord(1, b"x" * 16, records[0].key, 1, records[1].tokens)])):
        writer = _tier(directory)
        writer.store(chain, blocks)
        writer.close()
    assert len(_tier(honest, read_only=True, hasher=hasher)) == 2
    reader = _tier(forged, read_only=True, hasher=hasher)
    assert len(reader) == 0 and reader.num_foreign == 1
    assert len(_tier(forged, read_only=True)) == 2  # without a hasher the forgery would be indexed
    tier = _tier(forged, hasher=hasher)
    assert len(tier) == 0 and tier.num_rejected == 1 and not list(_segments(forged).glob("*" + SUFFIX))
    tier.close()


def test_a_hostile_snapshot_loads_what_is_sound_and_never_hangs(tiny_llama_dir, tmp_path):
    prompt = random_prompts([40], seed=1500)[0]
    greedy = rayk.SamplingParams(temperature=0, max_tokens=4)
    first = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    [expected] = first.generate(prompt, greedy)
    snapshot = tmp_path / "snapshot"
    saved = first.save_cache(str(snapshot))
    first.close()
    assert saved >= 2
    [segments] = [p for p in snapshot.iterdir() if p.name.startswith(SEGMENT_DIR_PREFIX)]
    os.mkfifo(segments / SEGMENT)  # a FIFO, a dangling link and a directory named like segments
    (segments / ("seg-" + "ee" * 12 + SUFFIX)).symlink_to(tmp_path / "missing")
    (segments / ("seg-" + "dd" * 12 + SUFFIX)).mkdir()
    second = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE)
    try:
        with _deadline(30):
            assert second.load_cache(str(snapshot)) == saved
        [output] = second.generate(prompt, greedy)
        assert output.token_ids == expected.token_ids and output.num_cached_tokens > 0
        [segment] = [p for p in segments.glob("*" + SUFFIX) if p.is_file() and not p.is_symlink() and p.stat().st_size]
        data = segment.read_bytes()
        length = int.from_bytes(data[len(MAGIC) : PREFIX_BYTES], "little")
        header = msgpack.unpackb(data[PREFIX_BYTES : PREFIX_BYTES + length])
        header["blocks"][-1][0] = bytes(len(header["blocks"][-1][0]))  # a key its tokens do not hash to
        packed = msgpack.packb(header, use_bin_type=True)
        segment.write_bytes(MAGIC + len(packed).to_bytes(4, "little") + packed + data[PREFIX_BYTES + length :])
        with pytest.raises(ValueError, match="a key its tokens do not hash to"):
            second.load_cache(str(snapshot))
    finally:
        second.close()


def test_an_engine_refuses_a_forged_segment_in_its_disk_dir(tiny_llama_dir, tmp_path):
    probe = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=16)
    layout, hasher = probe.engine.kv_cache.layout, probe.engine.kv_cache_manager.hasher
    probe.close()
    tokens = random_prompts([2 * BLOCK_SIZE], seed=1510)[0]
    keys = hasher.hash_blocks(tokens)
    forged_key = bytes(len(keys[1]))  # block 1 filed under a key its tokens do not hash to
    records = [
        BlockRecord(0, keys[0], hasher.root(), 0, token_bytes(tokens[:BLOCK_SIZE])),
        BlockRecord(1, forged_key, keys[0], 1, token_bytes(tokens[BLOCK_SIZE:])),
    ]
    writer = DiskTier(tmp_path, layout, hasher.fingerprint, 1 << 24, make_policy("lru"))
    writer.store(records, torch.zeros((2, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)))  # [K/V, layers, blocks, ...]
    writer.close()
    engine = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=16, disk_dir=str(tmp_path))
    try:
        disk = engine.stats()["disk_tier"]
        assert disk["cached_blocks"] == 0 and disk["rejected"] + disk["foreign_files"] >= 1
    finally:
        engine.close()


def test_with_an_integrity_key_forged_kv_on_disk_or_in_a_snapshot_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    """KV under a prompt's true keys, parents and tokens, finite, with correct checksums: only the
    integrity key tells it from the real thing. Without one the forgery is served (the control)."""
    monkeypatch.setenv("RAYK_TEST_INTEGRITY_KEY", "a per-deployment secret")
    prompt = random_prompts([40], seed=1520)[0]
    greedy = rayk.SamplingParams(temperature=0, max_tokens=4)
    options = {"block_size": BLOCK_SIZE, "num_device_blocks": 16}
    sealed = {**options, "integrity_key_env": "RAYK_TEST_INTEGRITY_KEY"}
    first = rayk.LLM(tiny_llama_dir, disk_dir=str(tmp_path / "kv"), **sealed)
    [expected] = first.generate(prompt, greedy)
    first.save_cache(str(tmp_path / "snapshot"))
    layout, hasher, segment_dir = first.engine.kv_cache.layout, first.engine.kv_cache_manager.hasher, first.engine.disk.segment_dir
    first.close()
    reader = rayk.LLM(tiny_llama_dir, **sealed)
    assert reader.load_cache(str(tmp_path / "snapshot")) == 2  # what was sealed under the key loads
    [output] = reader.generate(prompt, greedy)
    assert output.token_ids == expected.token_ids and output.num_cached_tokens == 2 * BLOCK_SIZE
    reader.close()

    keys = hasher.hash_blocks(prompt)
    records = [BlockRecord(i, keys[i], keys[i - 1] if i else hasher.root(), i, token_bytes(prompt[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])) for i in range(2)]
    shape = (2, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    forged = bytes(encode(records, torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 5, hasher.fingerprint, layout))
    for directory in (segment_dir, tmp_path / "snapshot" / segment_dir.name):
        for segment in directory.glob("*" + SUFFIX):
            segment.unlink()
        (directory / SEGMENT).write_bytes(forged)

    engine = rayk.LLM(tiny_llama_dir, disk_dir=str(tmp_path / "kv"), **sealed)
    try:
        disk = engine.stats()["disk_tier"]
        assert disk["cached_blocks"] == 0 and disk["rejected"] == 1
        with pytest.raises(ValueError, match="not sealed with this engine's integrity key"):
            engine.load_cache(str(tmp_path / "snapshot"))
        [output] = engine.generate(prompt, greedy)
        assert output.token_ids == expected.token_ids and output.num_cached_tokens == 0
    finally:
        engine.close()
    unkeyed = rayk.LLM(tiny_llama_dir, **options)
    try:
        assert unkeyed.load_cache(str(tmp_path / "snapshot")) == 2
        assert unkeyed.generate(prompt, greedy)[0].num_cached_tokens == 2 * BLOCK_SIZE  # served: forged KV
    finally:
        unkeyed.close()
