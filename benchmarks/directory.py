"""The coordinator's hot paths: KV event ingest into the prefix directory, and routing a request.

Both are measured against a baseline from the same run: a plain ``dict`` key → int bitmask (bit
``3 * slot + tier``) that does the same work, ``d[k] = d.get(k, 0) | bit`` per stored key and
clear-bit-or-delete per removed key, and whose route walks the prompt's keys (per key, each worker
still walking) and scores every worker the way the ``prefix`` policy does.

The workload, per size (blocks held in the cluster) and worker count: conversations of 4-56
unique blocks, half of them after one of 32 shared 8-block system prompts. A worker that serves a
conversation stores its blocks as one chain (and the system prompt first, if it lacks it); past
70% of its share of the blocks it demotes its oldest conversation to the host tier (removed from
device, stored in host), and past its share it drops the oldest host one. Each batch is one
worker's step: 1-3 conversations and what they push out, from a random worker.

* Ingest, block events/s: the batches of a steady state (the directory already full), as
  ``PrefixDirectory.apply`` against the baseline's. Goal: >= 1.4 x the baseline.
* Route latency, µs, for 64-block prompts that continue a held conversation (60%), start a new
  one after a system prompt (20%), or share nothing (20%); workers report random loads first, and
  a warm-up of as many prompts runs untimed. *Match + score*: ``Router.choose`` (policy
  ``prefix``, ``pull="never"``: the directory match and the scoring of every worker), the same
  work as the baseline's walk and scoring. Goal: p99 no worse than the baseline's. *Full route*:
  ``Router.route`` as deployed (``pull="auto"``), which adds what the baseline does not do
  (route-or-pull credit, pending claims, in-flight bookkeeping, stats, the decision record); its
  ratio to the baseline is shown for reference.
  The two are timed on disjoint prompt sets (a match caches the masks of shared keys).

Each round runs both sides on fresh copies, the order alternating per round; the table shows
medians over rounds, and ratios are medians of the per-round ratios. The garbage collector is
off in the timed phases of both sides, as in ``timeit``.

    python benchmarks/directory.py [--sizes 10000 1000000] [--workers 8 256] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from rayk.cache.events import BlocksRemoved, BlocksStored, KVEventBatch
from rayk.cluster.directory import TIERS, PrefixDirectory
from rayk.cluster.routing import DEFAULT_TIER_COSTS, Router, WorkerLoad

RESULTS = Path(__file__).parent / "results" / "directory.json"
BLOCK_SIZE = 16
PROMPT_BLOCKS = 64
SYSTEM_PROMPTS = 32
SYSTEM_PROMPT_BLOCKS = 8
ROOT = bytes(16)
TIER_BIT = {tier: index for index, tier in enumerate(TIERS)}
SIDES = ("rayk_choose", "rayk_route", "baseline_choose", "baseline_route")
QUANTILES = (("p50", 0.5), ("p99", 0.99))
ROUTE_INTERVAL_S = 0.001  # 1,000 routes/s: a claim of a completed request lasts 1,000 routes


@dataclass
class Workload:
    """Pre-generated batches (worker id, batch) and what is held after them."""

    fill: list[tuple[str, KVEventBatch]]
    steady: list[tuple[str, KVEventBatch]]
    conversations: list[tuple[bytes, ...]]  # held after the steady phase, as full chains
    system_prompts: list[tuple[bytes, ...]]
    num_held: int  # blocks held by the workers after the steady phase (a block on two workers counts twice)
    first_keys: list[bytes]  # every chain's first key, which the router notes when it routes the chain


    @property
    def steady_block_events(self) -> int:
        return sum(len(e.block_hashes) for _, batch in self.steady for e in batch.events)


@dataclass(frozen=True)
class _Conversation:
    parent: bytes  # ROOT, or the last key of its system prompt
    chain: tuple[bytes, ...]  # its own blocks, which it stores and evicts
    keys: tuple[bytes, ...]  # the full chain from the first block


class _SimulatedWorker:
    def __init__(self, worker_id: str, share: int):
        self.worker_id = worker_id
        self.share = share  # blocks it holds at most, device and host together
        self.seq = 0
        self.system_prompts: set[int] = set()
        self.device: deque[_Conversation] = deque()  # oldest first
        self.host: deque[_Conversation] = deque()
        self.num_device = self.num_host = self.num_dropped = 0

    def step(self, system_prompts: list[tuple[bytes, ...]], rng: random.Random) -> KVEventBatch:
        """One batch: 1-3 new conversations, then the demotions and drops they cause."""
        events = []
        for _ in range(rng.randint(1, 3)):
            chain = tuple(rng.randbytes(16) for _ in range(rng.randint(4, 56)))
            if rng.random() < 0.5:
                family = rng.randrange(SYSTEM_PROMPTS)
                if family not in self.system_prompts:
                    self.system_prompts.add(family)
                    events.append(BlocksStored("device", system_prompts[family], ROOT))
                conversation = _Conversation(system_prompts[family][-1], chain, system_prompts[family] + chain)
            else:
                conversation = _Conversation(ROOT, chain, chain)
            events.append(BlocksStored("device", chain, conversation.parent))
            self.device.append(conversation)
            self.num_device += len(chain)
            while self.num_device > 0.7 * self.share and len(self.device) > 1:
                old = self.device.popleft()
                events += [BlocksRemoved("device", old.chain), BlocksStored("host", old.chain, old.parent)]
                self.host.append(old)
                self.num_device -= len(old.chain)
                self.num_host += len(old.chain)
            while self.num_host > 0.3 * self.share and self.host:
                old = self.host.popleft()
                events.append(BlocksRemoved("host", old.chain))
                self.num_host -= len(old.chain)
                self.num_dropped += 1
        batch = KVEventBatch(self.seq, 0.0, tuple(events))
        self.seq += 1
        return batch


def make_workload(num_blocks: int, num_workers: int, steady_block_events: int, rng: random.Random) -> Workload:
    system_prompts = [tuple(rng.randbytes(16) for _ in range(SYSTEM_PROMPT_BLOCKS)) for _ in range(SYSTEM_PROMPTS)]
    workers = [_SimulatedWorker(f"worker-{i}", max(num_blocks // num_workers, 2 * PROMPT_BLOCKS)) for i in range(num_workers)]
    fill = []
    # Full: every worker has dropped a conversation from its host tier at least once.
    while not all(w.num_dropped for w in workers):
        worker = rng.choice(workers)
        fill.append((worker.worker_id, worker.step(system_prompts, rng)))
    steady, events = [], 0
    while events < steady_block_events:
        worker = rng.choice(workers)
        batch = worker.step(system_prompts, rng)
        steady.append((worker.worker_id, batch))
        events += sum(len(e.block_hashes) for e in batch.events)
    conversations = [c.keys for w in workers for c in (*w.device, *w.host)]
    num_held = sum(w.num_device + w.num_host for w in workers) + sum(len(w.system_prompts) for w in workers) * SYSTEM_PROMPT_BLOCKS
    first_keys = list(
        dict.fromkeys(e.block_hashes[0] for _, batch in fill + steady for e in batch.events if type(e) is BlocksStored and e.parent_hash == ROOT)
    )
    return Workload(fill, steady, conversations, system_prompts, num_held, first_keys)


class BaselineDirectory:
    """The plain design: one dict, key -> bitmask of (worker slot, tier) bits."""

    def __init__(self, worker_ids: list[str]):
        self.index: dict[bytes, int] = {}
        self.worker_ids = worker_ids
        self.slots = {worker_id: slot for slot, worker_id in enumerate(worker_ids)}

    def apply(self, worker_id: str, batch: KVEventBatch) -> None:
        index, base = self.index, 3 * self.slots[worker_id]
        for event in batch.events:
            if type(event) is BlocksStored:
                bit = 1 << (base + TIER_BIT[event.tier])
                for key in event.block_hashes:
                    index[key] = index.get(key, 0) | bit
            else:
                clear = ~(1 << (base + TIER_BIT[event.tier]))
                for key in event.block_hashes:
                    mask = index.get(key, 0) & clear
                    if mask:
                        index[key] = mask
                    else:
                        index.pop(key, None)

    def route(self, keys: list[bytes], num_tokens: int, queue_costs: list[float], saved_per_tier: tuple[float, ...]) -> str:
        """The prefix policy's choice: least queued cost minus the prefill the worker's cache saves."""
        max_blocks = min(len(keys), (num_tokens - 1) // BLOCK_SIZE)
        saved = [0.0] * len(self.worker_ids)
        alive = None
        for key in keys[:max_blocks]:
            mask = self.index.get(key, 0)
            if alive is None:
                alive = [slot for slot in range(len(self.worker_ids)) if mask >> (3 * slot) & 7]
            still = []
            for slot in alive:
                tiers = mask >> (3 * slot) & 7
                if tiers:
                    saved[slot] += saved_per_tier[(tiers & -tiers).bit_length() - 1]
                    still.append(slot)
            alive = still
            if not alive:
                break
        best, best_cost = 0, None
        for slot, queued in enumerate(queue_costs):
            cost = queued - saved[slot]
            if best_cost is None or cost < best_cost:
                best, best_cost = slot, cost
        return self.worker_ids[best]


def make_prompts(workload: Workload, count: int, rng: random.Random) -> list[tuple[list[bytes], int]]:
    prompts = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            start = list(rng.choice(workload.conversations))[:PROMPT_BLOCKS - 4]
        elif kind < 0.8:
            start = list(rng.choice(workload.system_prompts))
        else:
            start = []
        keys = start + [rng.randbytes(16) for _ in range(PROMPT_BLOCKS - len(start))]
        prompts.append((keys, PROMPT_BLOCKS * BLOCK_SIZE + 5))
    return prompts


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_round(workload: Workload, num_workers: int, prompts: dict[str, list], loads: list[WorkerLoad], rayk_first: bool) -> dict:
    """One round of both sides. ``prompts`` holds three disjoint sets: "warmup" (untimed),
    "choose" and "route" (each timed once on rayk, since a match caches shared masks, and on
    the baseline)."""
    worker_ids = [f"worker-{i}" for i in range(num_workers)]
    result = {}

    def rayk_side():
        directory = PrefixDirectory()
        for worker_id in worker_ids:
            directory.register(worker_id, 0)
        for key in workload.first_keys:  # as the router does when it routes each chain
            directory.note_prefix(key)
        for worker_id, batch in workload.fill:
            directory.apply(worker_id, 0, batch)
        start = time.perf_counter()
        for worker_id, batch in workload.steady:
            directory.apply(worker_id, 0, batch)
        result["rayk_ingest_s"] = time.perf_counter() - start
        router = Router(directory, BLOCK_SIZE)
        for worker_id, load in zip(worker_ids, loads):
            router.add_worker(worker_id)
            router.report_load(worker_id, load)
        clock = time.perf_counter_ns
        # Routes arrive every ROUTE_INTERVAL_S on a simulated clock and complete at once, so the
        # pending claims they leave expire as they would in a live deployment.
        now = 0.0
        for i, (keys, num_tokens) in enumerate(prompts["warmup"]):
            now += ROUTE_INTERVAL_S
            decision = router.route(f"warmup-{i}", keys, num_tokens, now=now)
            router.complete(decision.request_id, decision.predicted_hit_tokens, now=now)
        samples = []
        for keys, num_tokens in prompts["choose"]:
            start = clock()
            router.choose(keys, num_tokens, pull="never")  # the baseline's work: no route-or-pull credit
            samples.append((clock() - start) / 1000)
        result["rayk_choose_us"] = samples
        samples = []
        for i, (keys, num_tokens) in enumerate(prompts["route"]):
            now += ROUTE_INTERVAL_S
            start = clock()
            decision = router.route(f"r{i}", keys, num_tokens, now=now)
            samples.append((clock() - start) / 1000)
            router.complete(decision.request_id, decision.predicted_hit_tokens, now=now)
        result["rayk_route_us"] = samples
        directory.check_invariants()

    def baseline_side():
        baseline = BaselineDirectory(worker_ids)
        for worker_id, batch in workload.fill:
            baseline.apply(worker_id, batch)
        start = time.perf_counter()
        for worker_id, batch in workload.steady:
            baseline.apply(worker_id, batch)
        result["baseline_ingest_s"] = time.perf_counter() - start
        saved_per_tier = tuple(BLOCK_SIZE * (1 - DEFAULT_TIER_COSTS[tier]) for tier in TIERS)
        queue_costs = [0.5 * (load.queued_prefill_tokens + 4.0 * load.num_running) for load in loads]
        clock = time.perf_counter_ns
        for name in ("warmup", "choose", "route"):
            samples = []
            for keys, num_tokens in prompts[name]:
                start = clock()
                baseline.route(keys, num_tokens, queue_costs, saved_per_tier)
                samples.append((clock() - start) / 1000)
            result[f"baseline_{name}_us"] = samples

    for side in (rayk_side, baseline_side) if rayk_first else (baseline_side, rayk_side):
        gc.collect()
        gc.disable()
        try:
            side()
        finally:
            gc.enable()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="blocks held in the cluster")
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 256], help="worker counts")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration; medians are reported")
    parser.add_argument("--steady-events", type=int, default=400_000, help="block events in the timed ingest phase")
    parser.add_argument("--prompts", type=int, default=2000, help="prompts per set and round: warm-up (untimed), match + score, full route")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 10k blocks, 3 rounds, fewer events and prompts")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.steady_events, args.prompts = [10_000], 3, 50_000, 500

    rows, raw = [], {}
    for num_blocks in args.sizes:
        for num_workers in args.workers:
            rng = random.Random(args.seed)
            steady = min(args.steady_events, max(num_blocks, 50_000))
            workload = make_workload(num_blocks, num_workers, steady, rng)
            prompts = {name: make_prompts(workload, args.prompts, rng) for name in ("warmup", "choose", "route")}
            loads = [WorkerLoad(num_running=rng.randint(0, 16), queued_prefill_tokens=rng.randint(0, 4096)) for _ in range(num_workers)]
            rounds = [run_round(workload, num_workers, prompts, loads, rayk_first=r % 2 == 0) for r in range(args.rounds)]
            events = workload.steady_block_events
            row = {
                "blocks": num_blocks,
                "workers": num_workers,
                "blocks_held": workload.num_held,
                "ingest_block_events": events,
                "rayk_events_per_s": statistics.median(events / r["rayk_ingest_s"] for r in rounds),
                "baseline_events_per_s": statistics.median(events / r["baseline_ingest_s"] for r in rounds),
                "ingest_speedup": statistics.median(r["baseline_ingest_s"] / r["rayk_ingest_s"] for r in rounds),
            }
            for side in SIDES:
                for name, q in QUANTILES:
                    row[f"{side}_{name}_us"] = statistics.median(_percentile(r[f"{side}_us"], q) for r in rounds)
            for side in ("choose", "route"):
                for name, q in QUANTILES:
                    row[f"{side}_{name}_ratio"] = statistics.median(
                        _percentile(r[f"rayk_{side}_us"], q) / _percentile(r[f"baseline_{side}_us"], q) for r in rounds
                    )
            rows.append(row)
            raw[f"{num_blocks}x{num_workers}"] = [
                {
                    "rayk_ingest_s": r["rayk_ingest_s"],
                    "baseline_ingest_s": r["baseline_ingest_s"],
                    **{f"{side}_{name}_us": _percentile(r[f"{side}_us"], q) for side in SIDES for name, q in QUANTILES},
                }
                for r in rounds
            ]
            print(f"done: {num_blocks} blocks, {num_workers} workers", flush=True)

    header = (
        "| blocks | workers | ingest events/s rayk / baseline | ingest speedup (goal >= 1.4) "
        "| match+score µs p50, p99: rayk / baseline | p99 ratio (goal <= 1.0) | full route µs p50, p99 | p99 ratio |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['blocks']:,} | {r['workers']} | {r['rayk_events_per_s'] / 1e6:.2f}M / {r['baseline_events_per_s'] / 1e6:.2f}M "
        f"| {r['ingest_speedup']:.2f} "
        f"| {r['rayk_choose_p50_us']:.1f}, {r['rayk_choose_p99_us']:.1f} / {r['baseline_choose_p50_us']:.1f}, {r['baseline_choose_p99_us']:.1f} "
        f"| {r['choose_p99_ratio']:.2f} | {r['rayk_route_p50_us']:.1f}, {r['rayk_route_p99_us']:.1f} | {r['route_p99_ratio']:.2f} |"
        for r in rows
    ]
    print(header + "\n" + "\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    environment = {"python": platform.python_version(), "platform": platform.platform()}
    RESULTS.write_text(json.dumps({"config": vars(args), "environment": environment, "rows": rows, "rounds": raw}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
