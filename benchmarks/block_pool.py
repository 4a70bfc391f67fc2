"""The CPU cost of the prefix cache's bookkeeping: chained hashing and block-pool operations.

Every number is the median of ``--repeats`` runs, each compared with a baseline from the same run:

* Chained hashing, tokens/s: ``BlockHasher.hash_blocks`` at block sizes 16 and 256, against raw
  xxh3_128, that is one ``xxhash.xxh3_128_digest(block_bytes, seed)`` per block over the same bytes
  with the same seed but no parent key. Goal: chained >= 0.8 x raw.
* ``BlockPool``, block-ops/s at 1k and 100k blocks. One iteration is a request's life: allocate
  ``--batch`` blocks, ``cache_block`` each, free them, ``lookup`` each again (a hit) and ``touch``
  the hits, free them. Each block counts once per call it goes through (6 x batch per iteration).
  Goals: >= 1M block-ops/s, and the 100k-block pool as fast as the 1k one (ratio ~1.0).
* ``KVCacheManager``, the path the engine runs, the same way: one request misses
  (``find_prefix``, ``admit``, ``cache_blocks``, ``free``), then a second request with
  the same prompt hits. That is 8 x batch block-ops per iteration, and ``find_prefix`` hashes
  the prompt inside the timed region, as the engine does.

Both pools start full of cached free blocks, as after a long run, so every allocation evicts a
key. Keys, parents and encoded block tokens are computed before the timed region.

    python benchmarks/block_pool.py [--tokens 1000000] [--pool-sizes 1000 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import timeit
from pathlib import Path

import numpy as np
import xxhash

from rayk.cache.block_pool import BlockPool
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.tier_chain import TierChain
from rayk.hashing import BlockHasher, model_fingerprint, token_bytes

RESULTS = Path(__file__).parent / "results" / "block_pool.json"
VOCAB_SIZE = 32000
FINGERPRINT = model_fingerprint({"architecture": "benchmark", "dtype": "float32"})


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_hashing(token_ids: list[int], block_size: int, from_bytes: bool, repeats: int) -> dict:
    """Seconds per pass of chained and raw hashing over ``token_ids``, alternated in each repeat.

    Both sides encode the same input with ``token_bytes`` inside the timed region: the engine
    hands the hasher token ids, and leaving the encoding out of the baseline would charge it to
    rayk alone. With ``from_bytes`` both start from the encoded bytes instead, which isolates the
    per-block work (chaining: one concatenation per block).
    """
    hasher = BlockHasher(FINGERPRINT, block_size)
    seed, step = hasher.seed, hasher.block_bytes
    encoded = token_bytes(token_ids)
    num_full_bytes = len(token_ids) // block_size * step

    def raw():
        data = encoded if from_bytes else token_bytes(token_ids)
        digest = xxhash.xxh3_128_digest
        return [digest(data[offset : offset + step], seed) for offset in range(0, num_full_bytes, step)]

    def chained():
        if from_bytes:
            hashes: list[bytes] = []
            hasher.extend(hashes, encoded, hasher.empty_root)
            return hashes
        return hasher.hash_blocks(token_ids)

    assert len(raw()) == len(chained()), "chained and raw must make the same number of digests"
    # Enough passes per sample (the same for both) that a sample lasts >= 0.2 s, above timer noise.
    number, _ = timeit.Timer(chained).autorange()
    chained_s, raw_s = [], []
    for _ in range(repeats):
        chained_s.append(timeit.timeit(chained, number=number) / number)
        raw_s.append(timeit.timeit(raw, number=number) / number)
    return {"passes_per_sample": number, "chained_s": chained_s, "raw_s": raw_s}


def _prefilled_pool(num_blocks: int, block_size: int) -> BlockPool:
    """A pool whose blocks are all free and cached under filler keys: allocation always evicts."""
    pool = BlockPool(num_blocks, block_size)
    blocks = pool.allocate(num_blocks)
    filler_tokens = token_bytes([0] * block_size)
    for block in blocks:
        pool.cache_block(block, b"filler" + block.to_bytes(10, "little"), bytes(16), filler_tokens)
    pool.free(reversed(blocks))
    pool.events.drain()
    return pool


def _pool_iterations(pool: BlockPool, keys, parents, block_tokens, batch: int, first: int, count: int) -> list[int | None]:
    """Runs ``count`` request lifetimes on the pool; returns the last iteration's lookups."""
    hits = []
    for i in range(first, first + count):
        window = range(i * batch, (i + 1) * batch)
        blocks = pool.allocate(batch)
        for block, j in zip(blocks, window):
            pool.cache_block(block, keys[j], parents[j], block_tokens[j])
        pool.free(reversed(blocks))
        hits = [pool.lookup(keys[j], parents[j], block_tokens[j]) for j in window]
        pool.touch(hits)
        pool.free(reversed(hits))
        # The engine drains the event buffer once per step; without it the buffer grows unbounded.
        pool.events.drain()
    return hits


def _manager_iterations(kv: KVCacheManager, prompts: list[list[int]], first: int, count: int) -> list:
    """Runs ``count`` pairs of requests (a miss, then a hit on the same prompt); returns the last hits."""
    hits = []
    for i in range(first, first + count):
        prompt = prompts[i]
        hits = []
        for request_id in (f"{i}-miss", f"{i}-hit"):
            hit = kv.find_prefix(request_id, prompt)
            kv.admit(request_id, len(prompt), hit)
            kv.cache_blocks(request_id, prompt, len(prompt))
            kv.free(request_id)
            hits.append(hit)
        kv.pool.events.drain()
    return hits


def bench_pools(token_ids: list[int], args) -> dict[int, dict[str, list[float]]]:
    """Block-ops/s samples of the bare pool and of the manager for each size in ``--pool-sizes``.

    Every repeat runs each size in turn, so drift on a noisy machine hits all sizes alike.
    """
    batch, iterations, bs = args.batch, args.iterations, args.block_size
    hasher = BlockHasher(FINGERPRINT, bs)
    keys = hasher.hash_blocks(token_ids)
    parents = [hasher.empty_root] + keys[:-1]
    block_tokens = [token_bytes(token_ids[j * bs : (j + 1) * bs]) for j in range(len(keys))]
    prompts = [token_ids[i * batch * bs : (i + 1) * batch * bs] for i in range(len(keys) // batch)]

    pools = {n: _prefilled_pool(n, bs) for n in args.pool_sizes}
    managers = {n: KVCacheManager(TierChain(_prefilled_pool(n, bs)), hasher) for n in args.pool_sizes}
    samples = {n: {"pool_ops_per_s": [], "manager_ops_per_s": []} for n in args.pool_sizes}
    # One untimed iteration on each checks that the lookups hit; the timed ones follow.
    for n in args.pool_sizes:
        assert None not in _pool_iterations(pools[n], keys, parents, block_tokens, batch, 0, 1), "pool lookups must hit"
        miss, hit = _manager_iterations(managers[n], prompts, 0, 1)
        assert miss.num_tokens == 0 and hit.num_tokens == (batch * bs - 1) // bs * bs, "manager must miss, then hit"
    for r in range(args.repeats):
        first = 1 + r * iterations
        for n in args.pool_sizes:
            seconds = _time(lambda: _pool_iterations(pools[n], keys, parents, block_tokens, batch, first, iterations))
            samples[n]["pool_ops_per_s"].append(6 * batch * iterations / seconds)
            seconds = _time(lambda: _manager_iterations(managers[n], prompts, first, iterations))
            samples[n]["manager_ops_per_s"].append(8 * batch * iterations / seconds)
    for n in args.pool_sizes:
        pools[n].check_invariants()
        managers[n].check_invariants()
    return samples


def _row(measurement, size, rayk, baseline, ratio, goal) -> dict:
    return {"measurement": measurement, "size": size, "rayk": rayk, "baseline": baseline, "ratio": ratio, "goal": goal}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if value < 100 else f"{value / 1e6:.2f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="token ids hashed per pass (default 1M)")
    parser.add_argument("--hash-block-sizes", type=int, nargs="+", default=[16, 256], help="tokens per block for hashing")
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[1_000, 100_000], help="pool sizes in blocks; the first is the baseline")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block in the pool benchmarks")
    parser.add_argument("--batch", type=int, default=16, help="blocks per request in the pool benchmarks")
    parser.add_argument("--iterations", type=int, default=4000, help="requests per timed repeat and pool size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.pool_sizes) < 2 * args.batch:
        parser.error(f"--pool-sizes must be >= 2 x --batch ({2 * args.batch}) blocks")

    rng = np.random.default_rng(args.seed)
    hash_tokens = rng.integers(0, VOCAB_SIZE, args.tokens).tolist()
    # Enough distinct blocks for every iteration of every repeat, plus the untimed one.
    pool_tokens = rng.integers(0, VOCAB_SIZE, (args.repeats * args.iterations + 1) * args.batch * args.block_size).tolist()

    rows, raw = [], {"hashing": {}, "pool": {}}
    for block_size in args.hash_block_sizes:
        for from_bytes in (False, True):
            source = "bytes" if from_bytes else "token ids"
            samples = bench_hashing(hash_tokens, block_size, from_bytes, args.repeats)
            raw["hashing"][f"block_size={block_size},input={source}"] = samples
            chained = args.tokens / statistics.median(samples["chained_s"])
            baseline = args.tokens / statistics.median(samples["raw_s"])
            name = f"chained hash, tokens/s ({source} in)"
            rows.append(_row(name, f"block_size={block_size}", chained, baseline, chained / baseline, ">= 0.8"))

    pool_samples = bench_pools(pool_tokens, args)
    raw["pool"] = {str(n): samples for n, samples in pool_samples.items()}
    medians = {n: {kind: statistics.median(values) for kind, values in samples.items()} for n, samples in pool_samples.items()}
    smallest = args.pool_sizes[0]
    for kind, label in (("pool_ops_per_s", "BlockPool block-ops/s"), ("manager_ops_per_s", "KVCacheManager block-ops/s")):
        for num_blocks in args.pool_sizes:
            rate = medians[num_blocks][kind]
            if num_blocks == smallest:
                rows.append(_row(label, f"{num_blocks} blocks", rate, None, None, ">= 1M"))
            else:
                base = medians[smallest][kind]
                rows.append(_row(label, f"{num_blocks} blocks", rate, base, rate / base, ">= 1M, ratio ~1.0"))

    header = "| measurement | size | rayk | baseline | ratio | goal |\n|---|---|---|---|---|---|"
    lines = [f"| {r['measurement']} | {r['size']} | {_fmt(r['rayk'])} | {_fmt(r['baseline'])} | {_fmt(r['ratio'])} | {r['goal']} |" for r in rows]
    print(header + "\n" + "\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    environment = {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__, "xxhash": xxhash.VERSION}
    RESULTS.write_text(json.dumps({"config": vars(args), "environment": environment, "rows": rows, "samples": raw}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
