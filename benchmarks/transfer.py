"""Peer pulls between two Ray nodes: throughput against a raw ``ray.put`` / ``ray.get`` of the same
bytes, and the TTFT a pulled prefix buys against computing it.

A ``ray.cluster_utils.Cluster`` on 127.0.0.1: a head node without CPUs (the driver and the
coordinator) and two nodes with ``--cpus-per-node`` each, every node with its own object store.
A rayk deployment of two workers, one per node, serves ``--model`` (default: the default model,
SmolLM2-135M-Instruct). worker-0 computes a ``--prefix-tokens`` prompt once.

1. **Pull throughput.** worker-1's cache is emptied, then the prompt is sent to worker-1 with
   ``pull="always"`` and ``max_tokens=1``: worker-1 pulls the prefix's blocks from worker-0 (one
   ``export_blocks`` call whose returned batch Ray stores as one object on worker-0's node, then
   fetched to worker-1's node, header and checksums verified). Throughput is the batch's bytes
   over the pull's wall time as worker-1 measures it (``stats()["transfers"]``: the call, the
   source's export, the transfer and the checks). Baseline, between the same two nodes in the
   same run: an actor on worker-0's node ``ray.put``s a buffer of the same size (filled, so it is
   real memory) and hands the reference to an actor on worker-1's node, which ``ray.get``s it;
   timed by the getter from its call to holding the bytes. Goal: ratio >= 0.7.
2. **TTFT.** The same request to worker-1 (cache emptied before each), streamed by the driver,
   time to the first token: pulled (``pull="always"``) against computed (``pull="never"``). Goal:
   the pulled request's TTFT >= 10x faster.

The two sides alternate within every repeat (their order swapped on every other repeat), and the
ratios are medians of the per-repeat paired ratios. Device <-> host and disk copies against
plain copies are ``benchmarks/tiers.py``'s. Writes ``benchmarks/results/transfer.json`` and
prints a markdown table.

    python benchmarks/transfer.py [--prefix-tokens 2048] [--repeats 7] [--model PATH]
"""

from __future__ import annotations

import os

# Before Ray is imported: Ray then binds every node it starts to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster as RayTestCluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import rayk
from rayk.model.loader import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results" / "transfer.json"
NAMESPACE = "rayk-bench-transfer"


@ray.remote(num_cpus=0)
class Putter:
    def __init__(self):
        self.buffer = None

    def put(self, num_bytes: int) -> list:
        if self.buffer is None or len(self.buffer) != num_bytes:
            self.buffer = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
        return [ray.put(self.buffer)]


@ray.remote(num_cpus=0)
class Getter:
    async def fetch(self, putter, num_bytes: int) -> float:
        """Seconds from asking the putter to holding its bytes here."""
        start = time.perf_counter()
        [ref] = await putter.put.remote(num_bytes)
        data = await ref
        assert len(data) == num_bytes
        return time.perf_counter() - start


def _on(node_id: str):
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _transfers(cluster, worker: str) -> dict:
    return cluster.stats()["workers"][worker]["transfers"]


def _ttft(cluster, prompt, worker: str, pull: str) -> tuple[float, dict]:
    params = rayk.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    first = None
    output = None
    for delta in cluster.stream(prompt, params, worker=worker, pull=pull):
        if first is None and delta.new_token_ids:
            first = time.perf_counter() - start
        if delta.finished:
            output = delta.output
    return first, output.cached_tokens_by_tier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--object-store-mb", type=int, default=1024)
    args = parser.parse_args()

    nodes = RayTestCluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        nodes.add_node(num_cpus=args.cpus_per_node, object_store_memory=args.object_store_mb << 20)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        with rayk.Cluster(args.model, num_workers=2, namespace=NAMESPACE, device="cpu", max_model_len=args.prefix_tokens + 64) as cluster:
            vocab = cluster.vocab_size
            prompt = np.random.default_rng(1).integers(0, vocab, args.prefix_tokens + 1).tolist()
            stats = cluster.stats()["workers"]
            node_of = {w: s["node_id"] for w, s in stats.items()}
            assert node_of["worker-0"] != node_of["worker-1"], "the two workers share a node"
            bytes_per_token = stats["worker-0"]["device_pool"]["bytes_per_token"]
            cluster.generate(prompt, rayk.SamplingParams(temperature=0, max_tokens=1), worker="worker-0", pull="never")
            cluster._control("flush_events", "worker-0")
            putter = Putter.options(scheduling_strategy=_on(node_of["worker-0"])).remote()
            getter = Getter.options(scheduling_strategy=_on(node_of["worker-1"])).remote()

            def pulled_ttft():
                cluster.reset_prefix_cache(worker="worker-1")
                before = _transfers(cluster, "worker-1")
                ttft, by_tier = _ttft(cluster, prompt, "worker-1", "always")
                after = _transfers(cluster, "worker-1")
                num_bytes = after["pulled_bytes"] - before["pulled_bytes"]
                seconds = after["pull_seconds"] - before["pull_seconds"]
                assert by_tier["remote"] > 0 and num_bytes > 0, (by_tier, after["failed_pulls"])
                return {"ttft_s": ttft, "pull_bytes": num_bytes, "pull_s": seconds, "remote_tokens": by_tier["remote"]}

            def computed_ttft():
                cluster.reset_prefix_cache(worker="worker-1")
                ttft, by_tier = _ttft(cluster, prompt, "worker-1", "never")
                assert by_tier["remote"] == 0 and by_tier["device"] == 0
                return {"ttft_s": ttft}

            warm_up = pulled_ttft()  # first calls allocate and import, on every side
            computed_ttft()
            ray.get(getter.fetch.remote(putter, warm_up["pull_bytes"]))  # the putter fills its buffer untimed
            runs = []
            for repeat in range(args.repeats):
                first, second = (pulled_ttft, computed_ttft) if repeat % 2 == 0 else (computed_ttft, pulled_ttft)
                results = {first.__name__: first(), second.__name__: second()}
                pulled = results["pulled_ttft"]
                raw_s = ray.get(getter.fetch.remote(putter, pulled["pull_bytes"]))
                runs.append({"pulled": pulled, "computed": results["computed_ttft"], "raw_put_get_s": raw_s})
                print(f"repeat {repeat + 1}: pull {pulled['pull_bytes'] / pulled['pull_s'] / 1e9:.2f} GB/s, raw {pulled['pull_bytes'] / raw_s / 1e9:.2f} GB/s, "
                      f"TTFT pulled {pulled['ttft_s'] * 1e3:.0f} ms, computed {results['computed_ttft']['ttft_s'] * 1e3:.0f} ms", flush=True)
    finally:
        ray.shutdown()
        nodes.shutdown()

    pull_gbps = [r["pulled"]["pull_bytes"] / r["pulled"]["pull_s"] / 1e9 for r in runs]
    raw_gbps = [r["pulled"]["pull_bytes"] / r["raw_put_get_s"] / 1e9 for r in runs]
    throughput_ratio = statistics.median(p / q for p, q in zip(pull_gbps, raw_gbps))
    ttft_speedup = statistics.median(r["computed"]["ttft_s"] / r["pulled"]["ttft_s"] for r in runs)
    rows = [
        ("cross-node pull throughput", f"{statistics.median(pull_gbps):.2f} GB/s", f"{statistics.median(raw_gbps):.2f} GB/s (raw put/get)", throughput_ratio, 0.7),
        (
            f"TTFT, {args.prefix_tokens}-token prefix",
            f"{statistics.median(r['pulled']['ttft_s'] for r in runs) * 1e3:.0f} ms (pulled)",
            f"{statistics.median(r['computed']['ttft_s'] for r in runs) * 1e3:.0f} ms (computed)",
            ttft_speedup,
            10.0,
        ),
    ]
    print(f"\nmodel {args.model}, {bytes_per_token} KV bytes per token, {runs[0]['pulled']['pull_bytes'] / 1e6:.1f} MB per pull, {args.repeats} repeats\n")
    print("| measure | rayk | baseline | ratio (median of paired) | goal | result |")
    print("|---|---|---|---|---|---|")
    for name, ours, baseline, ratio, goal in rows:
        print(f"| {name} | {ours} | {baseline} | {ratio:.2f} | >= {goal} | {'PASS' if ratio >= goal else 'FAIL'} |")
    result = {
        "config": vars(args),
        "environment": {
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "ray_cluster": f"ray.cluster_utils.Cluster: a head without CPUs and 2 nodes x {args.cpus_per_node} CPUs on 127.0.0.1",
        },
        "bytes_per_token": bytes_per_token,
        "runs": runs,
        "medians": {"pull_gb_per_s": statistics.median(pull_gbps), "raw_put_get_gb_per_s": statistics.median(raw_gbps), "pull_vs_raw": throughput_ratio, "ttft_speedup": ttft_speedup},
        "goals": [{"measure": name, "ratio": ratio, "goal": goal, "pass": ratio >= goal} for name, _, _, ratio, goal in rows],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
