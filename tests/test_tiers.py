"""A device pool too small for the working set, with host and disk tiers below it: outputs stay
equal to transformers', report where their cached tokens came from, and survive a restart and
damaged files."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import torch

import rayk
from rayk.cache.block_codec import MAGIC
from rayk.cache.disk_tier import SUFFIX
from rayk.cache.transfer import CopyEngine
from tests.conftest import BLOCK_SIZE, chain_records, hf_greedy, random_prompts

MAX_NEW = 6
GREEDY = rayk.SamplingParams(temperature=0, max_tokens=MAX_NEW)
LENGTHS = (40, 50, 45, 60, 38, 55)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=21)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    return hf_greedy(tiny_model_dir, prompts, MAX_NEW)


def _tiered_llm(model_dir, disk_dir, **options):
    # 8 device blocks hold about two requests; 6 host blocks two more; the rest go to disk.
    return rayk.LLM(model_dir, block_size=BLOCK_SIZE, num_device_blocks=8, host_blocks=6, disk_dir=str(disk_dir), max_num_seqs=2, **options)


def _run_one_by_one(llm, prompts):
    return [llm.generate(p, GREEDY)[0] for p in prompts]


def test_a_small_device_pool_serves_from_host_and_disk_with_identical_tokens(tiny_model_dir, tmp_path, prompts, reference):
    llm = _tiered_llm(tiny_model_dir, tmp_path / "kv")
    cold = _run_one_by_one(llm, prompts)
    llm.engine.disk.flush()
    # Newest first: the last prompts are still on the device, older ones on the host, the oldest on disk.
    warm = _run_one_by_one(llm, prompts[::-1])[::-1]
    assert [o.token_ids for o in cold] == [o.token_ids for o in warm] == reference
    by_tier = {tier: sum(o.cached_tokens_by_tier[tier] for o in warm) for tier in ("device", "host", "disk", "remote")}
    assert by_tier["device"] > 0 and by_tier["host"] > 0 and by_tier["disk"] > 0 and by_tier["remote"] == 0
    assert all(sum(o.cached_tokens_by_tier.values()) == o.num_cached_tokens > 0 for o in warm)
    assert llm.stats()["prefix_cache"]["hit_tokens_by_tier"] == by_tier
    llm.engine.kv_cache_manager.check_invariants()
    llm.close()


def test_a_new_llm_on_the_same_disk_dir_is_served_from_disk(tiny_model_dir, tmp_path, prompts, reference):
    first = _tiered_llm(tiny_model_dir, tmp_path / "kv")
    _run_one_by_one(first, prompts)
    first.close()
    second = rayk.LLM(tiny_model_dir, block_size=BLOCK_SIZE, disk_dir=str(tmp_path / "kv"))
    outputs = second.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == reference
    assert [o.cached_tokens_by_tier["disk"] for o in outputs] == [(n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in LENGTHS]
    second.close()


def _rewrite_header(path, **changes):
    data = path.read_bytes()
    length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    header = msgpack.unpackb(data[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    header.update(changes)
    packed = msgpack.packb(header, use_bin_type=True)
    path.write_bytes(MAGIC + len(packed).to_bytes(4, "little") + packed + data[len(MAGIC) + 4 + length :])


def _segment_holding(files, key):
    """The segment file whose header lists ``key``, and that block's byte range in it."""
    for path in files:
        data = path.read_bytes()
        length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
        header = msgpack.unpackb(data[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
        for i, entry in enumerate(header["blocks"]):
            if entry[0] == key:
                start = len(MAGIC) + 4 + length + i * header["block_bytes"]
                return path, start, start + header["block_bytes"]
    raise AssertionError("no segment holds the key")


def test_damaged_or_foreign_segments_are_rejected_counted_and_recomputed(tiny_llama_dir, tmp_path, prompts):
    reference = hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    first = _tiered_llm(tiny_llama_dir, tmp_path / "kv")
    _run_one_by_one(first, prompts)
    read_back = first.engine.block_hashes(prompts[0])[0]
    segment_dir = first.engine.disk.segment_dir
    first.close()
    files = sorted(segment_dir.glob("*" + SUFFIX))
    assert len(files) >= 4
    flipped, start, end = _segment_holding(files, read_back)
    truncated, foreign_model, foreign_block_size = [f for f in files if f != flipped][:3]
    data = bytearray(flipped.read_bytes())
    data[(start + end) // 2] ^= 0xFF  # inside the payload: the header still parses
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    _rewrite_header(foreign_model, fingerprint=b"another model".ljust(32, b"\0"))
    _rewrite_header(foreign_block_size, layout={"layout": "x", "block_size": 32})

    second = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, disk_dir=str(tmp_path / "kv"))
    disk = second.stats()["disk_tier"]
    assert disk["rejected"] == 3 and disk["degraded"] and "deleted at start" in disk["degraded_reason"]
    outputs = second.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == reference
    disk = second.stats()["disk_tier"]
    assert disk["rejected"] == 4  # the flipped block, found when read
    assert disk["degraded"] and "checksum" in disk["degraded_reason"]
    assert outputs[0].cached_tokens_by_tier["disk"] == 0
    assert not flipped.exists() and not truncated.exists() and not foreign_model.exists() and not foreign_block_size.exists()
    second.close()


def test_a_host_copy_in_flight_is_never_reused_evicted_or_served(tiny_llama_dir, prompts):
    import threading

    reference = hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, host_blocks=6, max_num_seqs=1)
    host = llm.engine.host
    host.copy_engine = CopyEngine(torch.device("cpu"), threaded=True)  # asynchronous, as on CUDA
    gate = threading.Event()
    submit = host.copy_engine.submit
    host.copy_engine.submit = lambda copy: submit(lambda: (gate.wait(), copy()))
    # Each prompt evicts the previous ones' device blocks; their copies to the host wait at the gate
    # while later requests overwrite those very device blocks.
    first_pass = _run_one_by_one(llm, prompts)
    pending = host.pending_slots
    assert pending and len(pending) == host.pool.num_blocks
    assert all(host.pool.ref_counts[s] == 1 for s in pending) and host.pool.num_free_blocks == 0
    assert host.pool.num_cached_blocks == 0  # nothing in flight can be found, hence served
    assert llm.generate(prompts[0], GREEDY)[0].cached_tokens_by_tier["host"] == 0
    llm.engine.kv_cache_manager.check_invariants()
    gate.set()
    host.drain()
    assert host.pool.num_cached_blocks == len(pending) and not host.pending_slots
    assert all(host.pool.ref_counts[s] == 0 for s in pending)
    assert [o.token_ids for o in first_pass] == reference
    # Prompt 1's blocks were among the first demoted: the copies made behind the gate serve them.
    served = llm.generate(prompts[1], GREEDY)[0]
    assert served.cached_tokens_by_tier["host"] == 48 and served.token_ids == reference[1]
    llm.engine.kv_cache_manager.check_invariants()


def test_a_failing_disk_write_is_counted_and_the_writer_keeps_going(tiny_llama_dir, tmp_path, prompts):
    import shutil

    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, disk_dir=str(tmp_path / "kv"), max_num_seqs=1)
    shutil.rmtree(tmp_path / "kv")
    (tmp_path / "kv").write_text("")  # a file where the directory was: every write now fails
    _run_one_by_one(llm, prompts)
    llm.engine.disk.flush()
    assert llm.engine.disk.num_write_errors > 0 and llm.stats()["disk_tier"]["stored_blocks"] == 0
    (tmp_path / "kv").unlink()  # the directory is made anew by the next write
    _run_one_by_one(llm, prompts)
    llm.engine.disk.flush()
    assert llm.stats()["disk_tier"]["stored_blocks"] > 0
    llm.close()
    with pytest.raises(RuntimeError, match="is closed"):
        llm.engine.disk.store([], torch.zeros(0))


def test_a_rejection_only_drops_the_file_that_failed(tmp_path):
    from rayk.cache.block_pool import BlockRecord
    from rayk.cache.disk_tier import DiskTier
    from rayk.cache.paged_kv import KVLayout
    from rayk.cache.policies import make_policy
    from rayk.hashing import token_bytes

    layout = KVLayout(1, 4, 1, 8, torch.float32)
    tier = DiskTier(tmp_path, layout, bytes(32), 1 << 20, make_policy("lru"))
    record = BlockRecord(0, b"k" * 16, bytes(16), 0, token_bytes([1, 2, 3, 4]))
    tier.store([record], torch.ones(2, 1, 1, 4, 1, 8))
    tier.flush()
    read_while_stale = tier._index[record.key]
    tier.evict([record.key])
    tier.store([record], torch.full((2, 1, 1, 4, 1, 8), 2.0))
    tier.flush()
    tier._reject(record.key, read_while_stale, "stale")  # a reader that lost a race with evict + rewrite
    assert tier.num_rejected == 0 and tier.contains(record.key)
    assert torch.equal(tier.read(record.key, record.parent, record.tokens), torch.full((2, 1, 1, 4, 1, 8), 2.0))
    tier.close()


def test_a_disk_read_goes_into_the_memory_of_blocks_read_and_dropped_before(tmp_path):
    records, blocks = chain_records(3)
    tier = _small_disk_tier(tmp_path)
    tier.store(records, blocks)
    tier.flush()
    first = tier.read(records[0].key, records[0].parent, records[0].tokens)
    held = tier.read(records[1].key, records[1].parent, records[1].tokens)
    address = first.data_ptr()
    assert held.data_ptr() != address and torch.equal(first, blocks[:, :, :1])
    del first
    again = tier.read(records[2].key, records[2].parent, records[2].tokens)
    assert again.data_ptr() == address
    assert torch.equal(again, blocks[:, :, 2:3]) and torch.equal(held, blocks[:, :, 1:2])
    tier.close()


def test_blocks_demoted_to_disk_are_gathered_into_memory_the_tier_takes_back_once_written(tmp_path):
    from rayk.cache.paged_kv import KVLayout, PagedKVCache

    layout = KVLayout(1, 4, 1, 8, torch.float32)
    kv = PagedKVCache(layout, 8)
    kv.kv.copy_(torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1, 1).expand_as(kv.kv))
    records, _ = chain_records(3)
    tier = _small_disk_tier(tmp_path)
    first = tier.write_buffer(3)
    address = first.data_ptr()
    tier.store(records, kv.gather([r.block for r in records], out=first))
    del first
    assert tier.flush()
    for i, record in enumerate(records):  # gathered into the tier's memory, then written
        assert torch.equal(tier.read(record.key, record.parent, record.tokens), kv.kv[:, :, i : i + 1])
    assert tier.write_buffer(3).data_ptr() == address  # written: the memory is the tier's again
    tier.close()


def test_the_host_tier_is_sized_in_bytes(tiny_llama_dir):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, host_bytes=1 << 20)
    host = llm.memory_profile()["host"]
    assert host["physical_blocks"]["total"] == (1 << 20) // host["bytes_per_block"]
    assert 1 << 20 >= host["total_bytes"] > (1 << 20) - host["bytes_per_block"]


@pytest.mark.parametrize("options, error, match", [
    ({"host_bytes": 1 << 20, "host_blocks": 4}, ValueError, "host_blocks or host_bytes, not both"),
    ({"host_bytes": -1}, ValueError, "CacheConfig.host_bytes must be an int >= 0"),
    ({"host_bytes": 10}, ValueError, "host_bytes=10 holds no block"),
])
def test_bad_host_bytes_are_named(tiny_llama_dir, options, error, match):
    with pytest.raises(error, match=match):
        rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, **options)


# -- disk faults: each detected or bounded in time, the tier marked degraded, serving goes on ------


def _small_disk_tier(directory, **options):
    from rayk.cache.disk_tier import DiskTier
    from rayk.cache.paged_kv import KVLayout
    from rayk.cache.policies import make_policy

    return DiskTier(directory, KVLayout(1, 4, 1, 8, torch.float32), bytes(32), 1 << 20, make_policy("lru"), **options)


def test_a_block_filed_under_another_blocks_key_is_refused_and_its_segment_dropped(tmp_path):
    records, blocks = chain_records(2)
    tier = _small_disk_tier(tmp_path)
    tier.store(records, blocks)
    tier.close()
    [segment] = tier.segment_dir.glob("*" + SUFFIX)
    data = segment.read_bytes()
    length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    entries = msgpack.unpackb(data[len(MAGIC) + 4 : len(MAGIC) + 4 + length])["blocks"]
    entries[0][0], entries[1][0] = entries[1][0], entries[0][0]  # each key now names the other's block
    _rewrite_header(segment, blocks=entries)

    reopened = _small_disk_tier(tmp_path)
    assert reopened.contains(records[0].key)  # the header parses: only a read can tell
    for record in records:
        assert reopened.read(record.key, record.parent, record.tokens) is None
    health = reopened.health()
    assert reopened.num_rejected == 1 and not segment.exists() and len(reopened) == 0
    assert health["degraded"] and "another block's key" in health["degraded_reason"]
    reopened.close()


def _fail_writes(tier, error: OSError):
    def write_file(*args):
        raise error

    tier._write_file = write_file


def test_a_full_disk_marks_the_tier_degraded_until_a_write_lands_again(tmp_path):
    import errno

    records, blocks = chain_records(4)
    tier = _small_disk_tier(tmp_path)
    _fail_writes(tier, OSError(errno.ENOSPC, "No space left on device"))
    tier.store(records[:2], blocks[:, :, :2])
    assert tier.flush()
    health = tier.health()
    assert health["degraded"] and "No space left on device" in health["degraded_reason"]
    assert health["no_space_errors"] == health["write_errors"] == 1 and len(tier) == 0
    assert not list(tier.segment_dir.glob(".*.tmp"))  # nothing half-written is left behind
    del tier._write_file  # the disk has room again
    tier.store(records[2:], blocks[:, :, 2:])
    assert tier.flush()
    assert tier.health()["degraded"] is False and tier.health()["degraded_reason"] is None
    assert torch.equal(tier.read(records[3].key, records[3].parent, records[3].tokens), blocks[:, :, 3:4])
    tier.close()


def test_a_hung_write_is_bounded_and_what_it_lands_after_a_clear_is_not_indexed(tmp_path):
    import threading

    records, blocks = chain_records(3)
    tier = _small_disk_tier(tmp_path, write_timeout_s=0.3)
    gate, entered = threading.Event(), threading.Event()
    real_write = tier._write_file

    def hung_write(*args):
        entered.set()
        gate.wait()
        real_write(*args)

    tier._write_file = hung_write
    tier.store(records[:1], blocks[:, :, :1])
    assert entered.wait(5)
    start = time.monotonic()
    assert tier.flush() is False  # gave up on the hung write
    assert time.monotonic() - start < 0.3 + 0.5
    health = tier.health()
    assert health["degraded"] and "has not finished" in health["degraded_reason"] and health["hung_writes"] == 1
    tier.store(records[1:2], blocks[:, :, 1:2])  # not queued behind it: dropped
    assert tier.health()["dropped_blocks"] == 1
    start = time.monotonic()
    tier.clear()  # bounded too, though the write is still hung
    assert time.monotonic() - start < 0.5
    del tier._write_file
    gate.set()  # the hung write lands, after the clear: deleted, not indexed
    deadline = time.monotonic() + 5
    while tier.health()["degraded"] or tier._pending:
        assert time.monotonic() < deadline, tier.health()
        time.sleep(0.01)
    assert len(tier) == 0 and not list(tier.segment_dir.glob("*" + SUFFIX))
    tier.store(records[2:], blocks[:, :, 2:])
    assert tier.flush() and len(tier) == 1 and tier.health()["hung_writes"] == 1
    tier.close()


def test_a_write_hung_in_the_kernel_does_not_keep_the_process_from_exiting(tmp_path):
    """The payload of a segment is written from a thread of its own; a write that never returns
    (a dead network disk) must not hold the interpreter at exit, as a pool's worker would."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import threading
        import torch
        from rayk.cache import disk_tier
        from rayk.cache.paged_kv import KVLayout
        from rayk.cache.policies import make_policy
        from tests.conftest import chain_records

        never = threading.Event()
        disk_tier.os.pwritev = lambda *args: never.wait()
        records, blocks = chain_records(2)
        tier = disk_tier.DiskTier({str(tmp_path)!r}, KVLayout(1, 4, 1, 8, torch.float32), bytes(32), 1 << 20, make_policy("lru"), write_timeout_s=0.3)
        tier.store(records, blocks)
        assert tier.flush() is False
        tier.close()
        print("closed", flush=True)
        """
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr
    assert time.monotonic() - start < 30


def test_a_hung_disk_never_blocks_serving_or_shutdown(tiny_llama_dir, tmp_path, prompts):
    import threading

    reference = hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, disk_dir=str(tmp_path / "kv"), max_num_seqs=1)
    disk = llm.engine.disk
    disk.write_timeout_s = 0.5
    gate = threading.Event()
    disk._write_file = lambda *args: gate.wait()
    try:
        outputs = _run_one_by_one(llm, prompts)  # demotes blocks to the disk all along
        assert [o.token_ids for o in outputs] == reference
        done = threading.Event()
        control = threading.Thread(target=lambda: (llm.reset_prefix_cache(), llm.evict(prompts[0]), done.set()), daemon=True)
        control.start()  # memory controls wait for pending writes: at most write_timeout_s
        assert done.wait(5), "a memory control blocked on the hung disk"
        assert [o.token_ids for o in _run_one_by_one(llm, prompts)] == reference
        stats = llm.stats()["disk_tier"]
        assert stats["degraded"] and stats["hung_writes"] == 1 and stats["dropped_blocks"] > 0  # not queued behind it
        closed = threading.Thread(target=llm.close, daemon=True)
        closed.start()
        closed.join(5)
        assert not closed.is_alive(), "close blocked on the hung disk"
    finally:
        gate.set()


def test_a_full_disk_leaves_serving_correct_and_recovers(tiny_llama_dir, tmp_path, prompts):
    import errno

    reference = hf_greedy(tiny_llama_dir, prompts, MAX_NEW)
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, disk_dir=str(tmp_path / "kv"), max_num_seqs=1)
    disk = llm.engine.disk
    _fail_writes(disk, OSError(errno.ENOSPC, "No space left on device"))
    assert [o.token_ids for o in _run_one_by_one(llm, prompts)] == reference
    disk.flush()
    stats = llm.stats()["disk_tier"]
    assert stats["degraded"] and stats["no_space_errors"] > 0 and stats["cached_blocks"] == 0
    del disk._write_file
    assert [o.token_ids for o in _run_one_by_one(llm, prompts[::-1])] == reference[::-1]
    disk.flush()
    stats = llm.stats()["disk_tier"]
    assert not stats["degraded"] and stats["cached_blocks"] > 0
    llm.close()
