"""Throughput of rayk's tier transfers against plain copies of the same bytes, and the TTFT each tier buys.

1. **Device <-> host.** Batches of ``--batch-blocks`` blocks at shuffled, non-contiguous ids move
   through the engine's own calls: ``HostTier.demote(records, device_kv)`` (device -> host, then
   ``drain()`` so the copy is complete) and ``HostTier.onload(slots, device_kv, block_ids)``
   (host -> device), bookkeeping included. Baseline: ``dst.copy_(src)`` of one contiguous buffer
   of the same bytes (the pool's, written before timing). The host tier's memory is pinned
   exactly when the engine would pin it (CUDA present); the baseline's host buffer follows the
   same rule. Goal: ratio >= 0.7.
2. **Disk.** ``DiskTier.store(records, blocks)`` + ``flush()`` of ``--disk-blocks`` blocks, then
   one ``DiskTier.read(key, parent, tokens)`` per block, in order, every block held until the
   last is read (as a prefix hit holds them until they are copied to the device), against one
   ``write`` + ``flush`` of a single file of the same bytes and one ``readinto`` of it, in the same
   directory (under the current directory, not /dev/shm). One tier serves every repeat, as an
   engine keeps one, each repeat under new keys and cleared after it (untimed). DiskTier does not
   fsync, so neither does the baseline; an untimed ``os.sync()`` before each timed step keeps one
   side's writeback out of the other's timing. Page caches are not dropped: both sides read from
   the page cache. Goal: ratio >= 0.7.
3. **TTFT.** A tiny random Llama (written with transformers) is served by ``rayk.LLM`` with a
   device pool, a host tier and a disk tier. A 2k-token prompt runs once; distinct 2k-token
   fillers then push its prefix down to the tier under test; the prompt runs again with
   ``max_tokens=1`` and its ``ttft_s`` is taken. ``cached_tokens_by_tier`` of that run is
   asserted and stored, so the JSON says which tier served. Pending host copies and disk writes
   are drained before the timed run. Baseline: a prompt found nowhere (recomputed).

Medians of ``--repeats`` runs after one untimed warm-up; the two sides alternate, and ratios are
medians of the per-repeat paired ratios. On this project's CPU-only machines the "device" is a
CPU ``PagedKVCache``; ``--device cuda`` uses a CUDA pool and pinned host memory, but that path
has not been run by the author (the JSON says so in ``environment.cuda_path``).

    python benchmarks/tiers.py [--device auto] [--batch-blocks 64 512] [--disk-blocks 64] [--prompt-len 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import rayk
from rayk.cache.block_pool import BlockRecord
from rayk.cache.disk_tier import DiskTier
from rayk.cache.host_tier import HostTier
from rayk.cache.paged_kv import KVLayout, PagedKVCache
from rayk.cache.policies import make_policy
from rayk.cache.transfer import CopyEngine
from rayk.hashing import token_bytes

RESULTS = Path(__file__).parent / "results" / "tiers.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VOCAB_SIZE = 512
CPU = torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_cpu_seconds_of_others() -> float | None:
    """CPU seconds the whole machine has spent busy, minus this process's own (Linux only)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    user, nice, system = (int(v) for v in stat.read_text().split()[1:4])
    own = os.times()
    return (user + nice + system) / os.sysconf("SC_CLK_TCK") - own.user - own.system


def _seconds(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _timed_pair(ours, baseline, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds of ``ours`` and ``baseline``, alternated so drift hits both; one warm-up each."""
    ours(), baseline()
    ours_s, base_s = [], []
    for _ in range(repeats):
        ours_s.append(_seconds(ours, device))
        base_s.append(_seconds(baseline, device))
    return ours_s, base_s


def _row(name: str, num_blocks: int, num_bytes: int, ours_s: list[float], base_s: list[float]) -> dict:
    ours, base = num_bytes / statistics.median(ours_s) / 1e9, num_bytes / statistics.median(base_s) / 1e9
    paired = statistics.median(b / o for o, b in zip(ours_s, base_s))  # runs alternate: drift hits both
    return {
        "path": name,
        "blocks": num_blocks,
        "bytes": num_bytes,
        "rayk_gb_per_s": ours,
        "baseline_gb_per_s": base,
        "ratio": paired,
        "rayk_seconds": ours_s,
        "baseline_seconds": base_s,
    }


def bench_transfers(layout: KVLayout, device: torch.device, generator: torch.Generator, args) -> list[dict]:
    pool_blocks = 2 * max(args.batch_blocks)
    device_kv = PagedKVCache(layout, pool_blocks, device)
    raw = device_kv.kv.view(torch.uint8)  # random bytes: every bit pattern, compared as bytes
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator))
    host = HostTier(layout, pool_blocks, make_policy("lru"), copy_engine=CopyEngine(device))
    pinned = host.blocks.is_pinned()
    tokens = token_bytes(range(layout.block_size))
    rows = []
    for n in args.batch_blocks:
        block_ids = torch.randperm(pool_blocks, generator=generator)[:n].tolist()
        num_bytes = n * layout.bytes_per_block
        device_buffer = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        # The pool's own random bytes: on the CPU a buffer never written maps the kernel's shared
        # zero page, which stays in cache, so copying from it would run about 1.6x too fast.
        device_buffer.copy_(raw.reshape(-1)[:num_bytes])
        host_buffer = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pinned)
        records: list[BlockRecord] = []

        def demote():
            # Fresh keys each time, so no block is skipped as already cached; the last call's
            # blocks are evicted first, so every call copies all n blocks.
            host.evict([r.key for r in records])
            records[:] = [BlockRecord(b, os.urandom(16), bytes(16), 0, tokens) for b in block_ids]
            host.demote(records, device_kv)
            host.drain()

        ours, base = _timed_pair(demote, lambda: host_buffer.copy_(device_buffer), args.repeats, device)
        slots = [host.pool.cached[r.key] for r in records]
        moved, sent = host.gather(slots).contiguous().view(torch.uint8), device_kv.gather(block_ids).cpu().view(torch.uint8)
        assert torch.equal(moved, sent), "device -> host moved the wrong bytes"
        rows.append(_row("device -> host", n, num_bytes, ours, base))
        targets = block_ids[::-1]
        ours, base = _timed_pair(lambda: host.onload(slots, device_kv, targets), lambda: device_buffer.copy_(host_buffer), args.repeats, device)
        assert torch.equal(device_kv.gather(targets).cpu().view(torch.uint8), moved), "host -> device moved the wrong bytes"
        rows.append(_row("host -> device", n, num_bytes, ours, base))
    return rows


def bench_disk(layout: KVLayout, generator: torch.Generator, args) -> list[dict]:
    n, block_size = args.disk_blocks, layout.block_size
    blocks = torch.randn((2, layout.num_layers, n, block_size, layout.num_kv_heads, layout.head_dim), generator=generator, dtype=layout.dtype)
    payload = blocks.view(torch.uint8).numpy().reshape(-1)  # the same bytes, as one buffer, for the baseline
    readback = bytearray(payload.nbytes)
    write_s, base_write_s, read_s, base_read_s = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="rayk-tiers-", dir=".") as root:
        # One tier for every repeat, as a serving engine keeps one: the warm-up's first reads pay
        # for the tier's read buffers, as the baseline's first read pays for its buffer.
        disk = DiskTier(Path(root) / "tier", layout, b"tiers-benchmark", 1 << 50, make_policy("lru"))
        plain = Path(root) / "plain.bin"

        def write_plain():
            with plain.open("wb") as f:
                f.write(payload)
                f.flush()

        def read_plain():
            with plain.open("rb") as f:
                f.readinto(readback)

        for repeat in range(args.repeats + 1):  # the first is the warm-up
            records = [  # new keys each repeat: the tier writes and reads a batch it has not seen
                BlockRecord(block=i, key=os.urandom(16), parent=os.urandom(16), depth=i, tokens=token_bytes(range(i * block_size, (i + 1) * block_size)))
                for i in range(n)
            ]
            # Each timed step starts with no dirty pages left to write back (os.sync, untimed), so
            # neither side pays for the other's writes.
            os.sync()
            write = _seconds(lambda: (disk.store(records, blocks), disk.flush()), CPU)
            os.sync()
            base_write = _seconds(write_plain, CPU)
            os.sync()
            read_back = []
            read = _seconds(lambda: read_back.extend(disk.read(r.key, r.parent, r.tokens) for r in records), CPU)
            os.sync()
            base_read = _seconds(read_plain, CPU)
            assert all(b is not None for b in read_back) and torch.equal(torch.cat(read_back, dim=2), blocks), "disk read back wrong bytes"
            assert readback == payload.tobytes(), "plain file read back wrong bytes"
            read_back.clear()  # the blocks go back to the tier's read buffers
            disk.clear()  # untimed: the next repeat writes into an empty tier again
            plain.unlink()
            if repeat:
                for timings, seconds in zip((write_s, base_write_s, read_s, base_read_s), (write, base_write, read, base_read)):
                    timings.append(seconds)
        disk.close()
    return [_row("disk write", n, payload.nbytes, write_s, base_write_s), _row("disk read", n, payload.nbytes, read_s, base_read_s)]


def write_checkpoint(directory: str, max_positions: int) -> None:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def bench_ttft(work_dir: str, device: torch.device, generator: torch.Generator, args) -> list[dict]:
    """One row per prefix location; each location gets a fresh LLM of the same configuration."""
    model_dir = os.path.join(work_dir, "model")
    write_checkpoint(model_dir, max(4096, args.prompt_len + 1))
    blocks_per_prompt = args.prompt_len // 16
    device_blocks = math.ceil(1.25 * blocks_per_prompt) + 1  # one prompt fits; a second evicts the first
    host_blocks = math.ceil(2.5 * blocks_per_prompt)
    # Distinct prompts that push one prompt's blocks off the device (and then off the host), LRU order:
    # each evicts about a prompt's worth of blocks from the tier above.
    fillers = {
        "device": 0,
        "host": math.ceil(device_blocks / blocks_per_prompt),
        "disk": math.ceil((device_blocks + host_blocks) / blocks_per_prompt) + 1,
    }
    expected_hit = (args.prompt_len - 1) // 16 * 16  # the last prompt token is always computed
    greedy = rayk.SamplingParams(temperature=0, max_tokens=1)
    prompt = lambda: torch.randint(0, VOCAB_SIZE, (args.prompt_len,), generator=generator).tolist()  # noqa: E731
    rows = []
    for location in ("device", "host", "disk", "nowhere"):
        llm = rayk.LLM(
            model_dir,
            device=str(device),
            num_device_blocks=device_blocks,
            host_blocks=host_blocks,
            disk_dir=os.path.join(work_dir, f"disk-{location}"),
            max_model_len=max(4096, args.prompt_len + 1),
        )
        ttfts, served = [], []
        for repeat in range(args.repeats + 1):  # the first is the warm-up
            target = prompt()
            if location != "nowhere":
                llm.generate(target, greedy)
                for _ in range(fillers[location]):
                    llm.generate(prompt(), greedy)
            llm.engine.host.drain()  # no demotion copies or disk writes in flight while timing
            llm.engine.disk.flush()
            (output,) = llm.generate(target, greedy)
            by_tier = {tier: tokens for tier, tokens in output.cached_tokens_by_tier.items() if tokens}
            wanted = {} if location == "nowhere" else {location: expected_hit}
            assert by_tier == wanted, f"prefix meant to be served from {location} came from {by_tier}"
            if repeat:
                ttfts.append(output.ttft_s)
                served.append(by_tier)
        llm.close()
        rows.append({"location": location, "ttft_ms": 1e3 * statistics.median(ttfts), "ttft_seconds": ttfts, "cached_tokens_by_tier": served})
    recompute = rows[-1]["ttft_ms"]
    for row in rows:
        row["vs_recompute"] = row["ttft_ms"] / recompute
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    parser.add_argument("--layers", type=int, default=24, help="layers of the transfer benchmarks' KV layout")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block of the transfer benchmarks")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="KV dtype of the transfer benchmarks")
    parser.add_argument("--batch-blocks", type=int, nargs="+", default=[64, 512], help="blocks per device <-> host batch")
    parser.add_argument("--disk-blocks", type=int, default=64, help="blocks per disk write / read batch")
    parser.add_argument("--prompt-len", type=int, default=2048, help="tokens of the TTFT prompt (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompt_len < 32 or args.prompt_len % 16:
        parser.error(f"--prompt-len must be a multiple of 16 and >= 32, got {args.prompt_len}")
    if min(args.batch_blocks + [args.disk_blocks, args.repeats, args.layers, args.kv_heads, args.head_dim, args.block_size]) < 1:
        parser.error("--batch-blocks, --disk-blocks, --repeats, --layers, --kv-heads, --head-dim and --block-size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    transformers.utils.logging.disable_progress_bar()
    generator = torch.Generator().manual_seed(args.seed)
    others_before = _busy_cpu_seconds_of_others()
    layout = KVLayout(args.layers, args.block_size, args.kv_heads, args.head_dim, DTYPES[args.dtype])

    transfer_rows = bench_transfers(layout, device, generator, args) + bench_disk(layout, generator, args)
    with tempfile.TemporaryDirectory(prefix="rayk-tiers-", dir=".") as work_dir:
        ttft_rows = bench_ttft(work_dir, device, generator, args)

    shape = f"{args.layers} layers x {args.kv_heads} kv heads x {args.head_dim} head_dim x {args.block_size} tokens"
    print(f"KV layout: {shape}, {args.dtype}: {layout.bytes_per_block / 2**20:.2f} MiB per block; device {device}\n")
    print("| path | blocks | MiB | rayk GB/s | baseline GB/s | ratio | goal |")
    print("|---|---|---|---|---|---|---|")
    for r in transfer_rows:
        rates = f"{r['rayk_gb_per_s']:.2f} | {r['baseline_gb_per_s']:.2f} | {r['ratio']:.2f}"
        print(f"| {r['path']} | {r['blocks']} | {r['bytes'] / 2**20:.0f} | {rates} | >= 0.7 |")
    print(f"\n{args.prompt_len}-token prompt, tiny Llama, max_tokens=1:\n")
    print("| prefix location | TTFT ms | vs recompute | served from |")
    print("|---|---|---|---|")
    for r in ttft_rows:
        served = ", ".join(f"{t}: {n}" for t, n in r["cached_tokens_by_tier"][0].items()) or "-"
        print(f"| {r['location']} | {r['ttft_ms']:.1f} | {r['vs_recompute']:.2f}x | {served} |")
    others = None if others_before is None else round(_busy_cpu_seconds_of_others() - others_before, 1)
    environment = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cuda_path": "untested by the author: written for CUDA, run only on CPU-only machines",
        "host_memory_pinned": torch.cuda.is_available(),
        "reads_from_page_cache": True,
        "fsync": False,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # Other processes on the machine skew every number here: CPU seconds they used during the run.
        "other_processes_cpu_seconds": others,
    }
    if others is not None and others > 1:
        print(f"\nother processes used {others} CPU seconds during the run: every number above is skewed")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "environment": environment, "transfers": transfer_rows, "ttft": ttft_rows}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
