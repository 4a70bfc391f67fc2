"""Soak: thousands of requests above capacity, a killed worker and bad input; nothing lost, nothing leaked.

A rayk deployment of ``--workers`` CPU workers on a ``ray.cluster_utils.Cluster`` of ``--nodes``
nodes on 127.0.0.1 (each with its own object store) serves ``--requests`` requests, sent from one
driver at ``--rate`` per second, more than the workers serve, with ``max_queued_requests`` set:
the deployment refuses what it cannot queue with ``rayk.Overloaded``, and the driver does not
send those again. Prompts are token ids of random lengths, most behind one of ``--prefixes``
shared prefixes; ``max_tokens`` is random too. ``--cancel-fraction`` of the requests are streams
that the driver abandons after their first delta (the worker aborts them). ``--pull-fraction``
of the requests behind a shared prefix go, with ``pull="always"``, to the next worker in turn
rather than where the router would send them: when that worker lacks the prefix it pulls its
blocks from a holder through the object store. The generated model's KV is sized
(``--hidden-size``, ``--layers``, ``--kv-heads``) so that one pulled batch is far above the
~100 KiB under which Ray inlines an object instead of storing it. After
``--kill-at`` of the requests are sent, one worker's process is SIGKILLed (Ray restarts it:
its requests are sent again by the driver, or fail with an error: a stream, or a forced pull,
which names its worker and so is not sent elsewhere); after ``--bad-at``, a list of
bad calls is made, each of which must raise a clear error while the load goes on.

Every ``--sample-s`` a monitor reads ``Cluster.stats()``: the peak of each tier and of the
requests in flight, and the transfers (pulls counted across a worker's restart). Every
``--store-sample-s`` another thread reads the object stores of every node (bytes and objects in
use, summed by the raylet's global memory info): a pulled batch lives there only from its export
until the puller has staged its blocks, so it is sampled far more often.

Once every request has its answer (or ``--drain-s`` has passed: what has none then is *lost*),
it checks, and reports as a markdown table:

- requests sent, completed, refused (``Overloaded``), failed with a clear error, lost (must be 0),
  and completions whose greedy tokens differ from ``rayk.LLM`` in this process (``--verify``
  of them are compared; must be 0);
- faults injected; bad inputs tried, each with the error it got (each must be a clear error);
- leaked blocks: device blocks still in use on every worker once drained (``check_invariants``
  control; must be 0), and requests still in flight at the coordinator;
- pulls and pulled bytes (all workers), the bytes created in the object stores during the run,
  and the peak memory per tier (device and host blocks, object store bytes);
- once the caches are reset, each tier back to its baseline: no blocks cached, and the object
  stores of every node back to their bytes and objects before the deployment started (no
  pinned objects left).

The process exits 1 when anything that must be 0 is not. JSON goes to ``--out``
(default ``benchmarks/results/soak.json``).

    python benchmarks/soak.py                    # 3000 requests, a few minutes on 2 cores
    python benchmarks/soak.py --requests 300     # a quick one (tests/test_soak.py)
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1

import argparse
import concurrent.futures
import json
import math
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
import transformers
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from ray.cluster_utils import Cluster as RayTestCluster
from transformers import LlamaConfig, LlamaForCausalLM

import rayk

RESULTS = Path(__file__).parent / "results" / "soak.json"
MAX_MODEL_LEN = 256
HEAD_DIM = 64  # of the generated model: attention heads = hidden size / HEAD_DIM


def write_checkpoint(directory: str, vocab_size: int, hidden_size: int, layers: int, kv_heads: int) -> None:
    """A small random Llama (the soak measures the system, not the model) whose KV per token,
    ``2 * layers * kv_heads * HEAD_DIM * 4`` bytes in float32, sizes the pulled batches."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // HEAD_DIM,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def make_requests(args, rng: np.random.Generator) -> list[tuple[list[int], int, bool, bool]]:
    """(prompt token ids, max_tokens, abandoned stream?, forced pull?) per request: 70 % behind a
    shared prefix, ``args.pull_fraction`` of those (never a stream) sent to pull it."""
    prefixes = [rng.integers(0, args.vocab_size, int(rng.integers(32, 97))).tolist() for _ in range(args.prefixes)]
    requests = []
    for _ in range(args.requests):
        suffix = rng.integers(0, args.vocab_size, int(rng.integers(1, 64))).tolist()
        shared = rng.random() < 0.7
        prompt = (prefixes[int(rng.integers(len(prefixes)))] + suffix) if shared else suffix
        cancel = bool(rng.random() < args.cancel_fraction)
        pull = bool(shared and not cancel and rng.random() < args.pull_fraction)
        requests.append((prompt, int(rng.integers(1, 9)), cancel, pull))
    return requests


class ObjectStores:
    """The object stores of every node, read through one raylet: it gathers every node's store
    statistics (Ray's ``FormatGlobalMemoryInfo``, what ``ray memory --stats-only`` prints)."""

    def __init__(self):
        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def read(self) -> dict[str, int]:
        """Bytes and objects in use now, and bytes and objects created since each store started."""
        stats = get_memory_info_reply(self._state, timeout_seconds=10.0).store_stats
        return {
            "bytes": int(stats.object_store_bytes_used),
            "objects": int(stats.num_local_objects),
            "created_bytes": int(stats.cumulative_created_bytes),
            "created_objects": int(stats.cumulative_created_objects),
        }


class Periodic:
    """Calls ``sample`` every ``interval_s`` on its own thread from ``start`` until ``close``;
    counts the calls that completed and the errors of the others by type."""

    def __init__(self, name: str, interval_s: float, sample: Callable[[], None]):
        self.interval_s = interval_s
        self.sample = sample
        self.samples = 0
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
                self.samples += 1
            except Exception as error:  # a worker restarting mid-call: the next sample counts
                self.errors[type(error).__name__] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class StoreMonitor:
    """The peak bytes and objects in use in the object stores of every node."""

    def __init__(self, stores: ObjectStores):
        self.stores = stores
        self.peaks: Counter[str] = Counter()

    def sample(self) -> None:
        now = self.stores.read()
        for key in ("bytes", "objects"):
            self.peaks[key] = max(self.peaks[key], now[key])


TRANSFER_COUNTS = ("pulls", "pulled_blocks", "pulled_bytes", "served_blocks", "served_bytes")


class Monitor:
    """Samples the deployment's stats: the peak of each tier and the transfers of every worker.

    A restarted worker starts its counters from 0: what it counted before is banked, so the
    totals hold every transfer up to each worker's last sample before it died."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.peaks: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last: dict[str, Counter[str]] = {}  # per worker: its counters at its last sample
        self._banked: Counter[str] = Counter()  # what workers counted before they restarted

    def transfers(self) -> dict:
        """The sums of ``TRANSFER_COUNTS`` over every worker, and ``failed_pulls``: their number
        and ``failed_by_reason``."""
        with self._lock:
            total = Counter(self._banked)
            for counts in self._last.values():
                total.update(counts)
        failed = {key.removeprefix("failed:"): n for key, n in total.items() if key.startswith("failed:") and n}
        return {key: total[key] for key in TRANSFER_COUNTS} | {"failed_pulls": sum(failed.values()), "failed_by_reason": failed}

    def _count_transfers(self, workers: dict[str, dict]) -> None:
        with self._lock:
            for worker_id, stats in workers.items():
                t = stats["transfers"]
                now = Counter({key: t[key] for key in TRANSFER_COUNTS} | {f"failed:{reason}": n for reason, n in t["failed_pulls"].items()})
                last = self._last.get(worker_id)
                if last is not None and any(now[key] < last[key] for key in last):  # restarted: bank the old counts
                    self._banked.update(last)
                self._last[worker_id] = now

    def sample(self) -> None:
        stats = self.cluster.stats()
        self._count_transfers(stats["workers"])
        workers = stats["workers"].values()
        now = {
            "device_used_blocks": sum(w["device_pool"]["used_blocks"] for w in workers),
            "device_cached_blocks": sum(w["device_pool"]["cached_blocks"] for w in workers),
            "host_cached_blocks": sum((w["host_tier"] or {}).get("cached_blocks", 0) for w in workers),
            "queued_or_running": sum(w["load"]["waiting"] + w["load"]["running"] for w in workers),
            "in_flight": stats["routing"]["peak_in_flight"],  # the router's own peak: exact, not sampled
        }
        for key, value in now.items():
            self.peaks[key] = max(self.peaks[key], value)


def bad_calls(cluster, vocab_size: int) -> list[tuple[str, Callable[[], object]]]:
    """Calls a client may get wrong, each with what it does; every one must raise a clear error."""
    greedy = rayk.SamplingParams(temperature=0, max_tokens=2)
    good = [1, 2, 3, 4]
    return [
        ("token id outside the vocabulary", lambda: cluster.generate([vocab_size + 5], greedy)),
        ("empty prompt", lambda: cluster.generate([[]], greedy)),
        ("prompt of floats", lambda: cluster.generate([[1.5, 2.0]], greedy)),
        ("NaN temperature", lambda: cluster.generate(good, rayk.SamplingParams(temperature=math.nan))),
        ("inf top_p", lambda: cluster.generate(good, rayk.SamplingParams(top_p=math.inf))),
        ("huge max_tokens", lambda: cluster.generate(good, rayk.SamplingParams(max_tokens=10**9))),
        ("prompt over the context", lambda: cluster.generate([0] * (MAX_MODEL_LEN + 1), greedy)),
        ("unknown routing policy", lambda: cluster.generate(good, greedy, routing="fastest")),
        ("unknown worker in a request", lambda: cluster.generate(good, greedy, worker="worker-99")),
        ("unknown worker in a control", lambda: cluster.pin(good, worker="worker-99")),
        ("cache_salt of the wrong type", lambda: cluster.generate(good, greedy, cache_salt=12345)),
        ("negative tier budget", lambda: cluster.set_budget("host", -1)),
        ("sampling_params as a dict", lambda: cluster.generate(good, {"temperature": 0})),
    ]


def try_bad_inputs(cluster, vocab_size: int) -> list[dict]:
    tried = []
    for name, call in bad_calls(cluster, vocab_size):
        try:
            call()
        except (ValueError, TypeError) as error:
            message = str(error).splitlines()[0] if str(error) else ""
            tried.append({"input": name, "error": type(error).__name__, "message": message, "clear": bool(message)})
        except Exception as error:  # anything else is not the clear error a client should get
            tried.append({"input": name, "error": type(error).__name__, "message": str(error).splitlines()[0][:200], "clear": False})
        else:
            tried.append({"input": name, "error": None, "message": "accepted", "clear": False})
    return tried


class Outcomes:
    """Counts what became of every request; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.outputs: dict[int, list[int]] = {}

    def count(self, what: str, error: BaseException | None = None) -> None:
        with self._lock:
            self.counts[what] += 1
            if error is not None:
                first = str(error).strip().splitlines()
                self.errors[f"{type(error).__name__}: {(first[-1] if first else '')[:160]}"] += 1

    def completed(self, index: int, token_ids: list[int]) -> None:
        with self._lock:
            self.counts["completed"] += 1
            self.outputs[index] = token_ids


def run_load(cluster, requests, args, outcomes: Outcomes, kill_pid: int, before_kill: Callable[[], None]) -> dict:
    """Sends every request at ``args.rate``, a forced pull to the next live worker in turn;
    calls ``before_kill`` just before the kill. Returns the faults and bad inputs, the forced
    pulls sent, and the send and drain times."""
    futures: list[concurrent.futures.Future] = []
    forced = 0
    streams = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="soak-stream")
    kill_at, bad_at = int(args.kill_at * len(requests)), int(args.bad_at * len(requests))
    faults, bad = [], []
    start = time.monotonic()

    def abandon(index: int, prompt, params) -> None:
        stream = cluster.stream(prompt, params)
        try:
            delta = next(stream)
            if delta.finished:
                outcomes.completed(index, delta.output.token_ids)
            else:
                outcomes.count("cancelled")
        except rayk.Overloaded:
            outcomes.count("refused")
        except Exception as error:
            outcomes.count("failed", error)
        finally:
            stream.close()

    def done(index: int, future: concurrent.futures.Future) -> None:
        try:
            outcomes.completed(index, future.result().token_ids)
        except rayk.Overloaded:  # sent again after its worker died, and refused then
            outcomes.count("refused")
        except Exception as error:
            outcomes.count("failed", error)

    for index, (prompt, max_tokens, cancel, pull) in enumerate(requests):
        delay = start + index / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if index == kill_at and kill_pid:
            before_kill()
            os.kill(kill_pid, signal.SIGKILL)
            faults.append({"fault": "SIGKILL of worker-1's process", "pid": kill_pid, "after_requests": index, "at_s": round(time.monotonic() - start, 2)})
        if index == bad_at:
            bad = try_bad_inputs(cluster, args.vocab_size)
        params = rayk.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        if cancel:
            futures.append(streams.submit(abandon, index, prompt, params))
            continue
        try:
            if pull:
                live = cluster.workers()  # the killed worker is not routable until it is back
                future = cluster.submit(prompt, params, worker=live[forced % len(live)], pull="always")
                forced += 1
            else:
                future = cluster.submit(prompt, params)
        except rayk.Overloaded:
            outcomes.count("refused")
            continue
        except Exception as error:
            outcomes.count("failed", error)
            continue
        future.add_done_callback(lambda f, index=index: done(index, f))
        futures.append(future)
    sent_s = time.monotonic() - start
    _, unfinished = concurrent.futures.wait(futures, timeout=args.drain_s)
    streams.shutdown(wait=False, cancel_futures=True)
    return {"faults": faults, "bad_inputs": bad, "forced_pulls": forced, "send_s": sent_s, "drain_s": time.monotonic() - start - sent_s, "unanswered": len(unfinished)}


def wait_for(condition, timeout_s: float, interval_s: float = 0.2):
    """``condition()``'s last value, once true or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def drained_state(cluster, workers: list[str], stores: ObjectStores, baseline: dict[str, int]) -> dict:
    """What is left once every request is answered: blocks in use and requests per worker (with
    the cache's invariants asserted), requests in flight at the coordinator, and, once every
    tier is reset, cached blocks per tier and the object stores (bytes and objects in use on
    every node) against their baseline, waited for up to 15 s (Ray frees an object once its
    owner drops the last reference, not at once)."""
    wait_for(lambda: set(workers) <= set(cluster.workers()), 60)  # the killed worker is back
    in_flight = wait_for(lambda: cluster.stats()["routing"]["in_flight"] == 0 or None, 10) is None
    leftover = cluster._control("check_invariants", None)
    cluster.reset_prefix_cache()
    stats = cluster.stats()["workers"]

    def at_baseline():
        used = stores.read()
        return used if used["bytes"] <= baseline["bytes"] and used["objects"] <= baseline["objects"] else None

    store = wait_for(at_baseline, 15) or stores.read()
    return {
        "per_worker": leftover,
        "leaked_blocks": sum(v["used_blocks"] for v in leftover.values()),
        "requests_left": sum(v["running"] + v["waiting"] + v["staged_requests"] for v in leftover.values()),
        "in_flight_left": cluster.stats()["routing"]["in_flight"] if in_flight else 0,
        "device_cached_after_reset": sum(w["device_pool"]["cached_blocks"] for w in stats.values()),
        "host_cached_after_reset": sum((w["host_tier"] or {}).get("cached_blocks", 0) for w in stats.values()),
        "object_store_bytes": store["bytes"],
        "object_store_objects": store["objects"],
        "object_store_created_bytes": store["created_bytes"] - baseline["created_bytes"],
        "object_store_created_objects": store["created_objects"] - baseline["created_objects"],
    }


def verify(model_dir: str, requests, outputs: dict[int, list[int]], count: int, block_size: int) -> dict:
    """Greedy tokens of ``count`` completed requests against ``rayk.LLM`` in this process."""
    sample = sorted(outputs)[:: max(1, len(outputs) // max(count, 1))][:count]
    if not sample:
        return {"compared": 0, "mismatched": 0}
    llm = rayk.LLM(model_dir, device="cpu", block_size=block_size, max_model_len=MAX_MODEL_LEN)
    params = [rayk.SamplingParams(temperature=0, max_tokens=requests[i][1], ignore_eos=True) for i in sample]
    reference = llm.generate([requests[i][0] for i in sample], params)
    mismatched = sum(outputs[i] != ref.token_ids for i, ref in zip(sample, reference))
    return {"compared": len(sample), "mismatched": mismatched}


def print_table(result: dict) -> None:
    r, d, p, b, t = result["requests"], result["drained"], result["peaks"], result["baseline"], result["transfers"]
    rows = [
        ("requests sent", r["sent"]),
        ("completed", r["completed"]),
        ("refused (rayk.Overloaded)", r["refused"]),
        ("cancelled (stream abandoned)", r["cancelled"]),
        ("failed with a clear error", r["failed"]),
        ("**lost** (must be 0)", r["lost"]),
        (f"wrong tokens (of {result['verified']['compared']} compared with rayk.LLM)", result["verified"]["mismatched"]),
        ("offered / sent / served rate (req/s)", f"{result['offered_rate']:.0f} / {result['sent_rate']:.0f} / {result['served_rate']:.1f}"),
        ("faults injected", "; ".join(f["fault"] for f in result["faults"]) or "none"),
        ("bad inputs tried (each a clear error)", f"{sum(x['clear'] for x in result['bad_inputs'])} / {len(result['bad_inputs'])}"),
        ("**leaked blocks** once drained (must be 0)", d["leaked_blocks"]),
        ("requests left on workers / in flight at the coordinator", f"{d['requests_left']} / {d['in_flight_left']}"),
        (f"peak requests in flight (bound {result['config']['max_queued_requests']})", p["in_flight"]),
        ("peak device blocks in use / cached (all workers)", f"{p['device_used_blocks']} / {p['device_cached_blocks']}"),
        ("peak host blocks cached (all workers)", p["host_cached_blocks"]),
        (f"pulls (of {result['forced_pulls']} requests sent to pull) / failed (a recompute)", f"{t['pulls']} / {t['failed_pulls']} {t['failed_by_reason'] or ''}".rstrip()),
        ("pulled blocks / bytes (all workers)", f"{t['pulled_blocks']} / {t['pulled_bytes']}"),
        ("pulled bytes per pull (Ray inlines objects under 100 KiB)", f"{t['pulled_bytes'] / max(t['pulls'], 1):.0f}"),
        ("object store: objects / bytes created during the run (all nodes)", f"{d['object_store_created_objects']} / {d['object_store_created_bytes']}"),
        (f"peak object store bytes / objects in use (all nodes, {result['store_samples']} samples)", f"{p['object_store_bytes']} / {p['object_store_objects']}"),
        ("after reset: device / host blocks cached", f"{d['device_cached_after_reset']} / {d['host_cached_after_reset']}"),
        ("after drain: object store bytes / objects (baseline)", f"{d['object_store_bytes']} / {d['object_store_objects']} ({b['bytes']} / {b['objects']})"),
        ("wall time (s)", f"{result['wall_s']:.1f}"),
    ]
    print("| what | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\nbad inputs:")
    for x in result["bad_inputs"]:
        print(f"  - {x['input']}: {x['error']}: {x['message'][:140]}")
    if result["errors"]:
        print("\nerrors of failed requests:")
        for message, n in sorted(result["errors"].items(), key=lambda kv: -kv[1]):
            print(f"  - {n} x {message}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--requests", type=int, default=3000, help="requests to send (default 3000)")
    parser.add_argument("--rate", type=float, default=400.0, help="requests offered per second, above what the workers serve (default 400)")
    parser.add_argument("--max-queued-requests", type=int, default=12, help="the deployment's backpressure bound (default 12)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2, help="local Ray nodes, each with its own object store")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--model", default=None, help="a local Hugging Face directory (default: a small random Llama in a temp dir, sized by the next options)")
    parser.add_argument("--vocab-size", type=int, default=None, help="of the prompts' token ids (default: the model's)")
    parser.add_argument("--hidden-size", type=int, default=256, help=f"of the generated model, a multiple of {HEAD_DIM} (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="of the generated model (default 4)")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads of the generated model, dividing its hidden size / 64 (default 4: 8 KiB of KV per token)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device-blocks", type=int, default=96, help="device pool blocks per worker (small: evictions to the host tier)")
    parser.add_argument("--host-blocks", type=int, default=256, help="host tier blocks per worker")
    parser.add_argument("--prefixes", type=int, default=12, help="shared prefixes")
    parser.add_argument("--cancel-fraction", type=float, default=0.05, help="requests sent as streams and abandoned after their first delta")
    parser.add_argument("--pull-fraction", type=float, default=0.1, help="requests behind a shared prefix sent to the next worker with pull='always'")
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of the requests sent before worker-1 is SIGKILLed (1: never)")
    parser.add_argument("--bad-at", type=float, default=0.6, help="fraction of the requests sent before the bad inputs are tried")
    parser.add_argument("--verify", type=int, default=40, help="completions compared with rayk.LLM in this process")
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between the monitor's samples of the stats")
    parser.add_argument("--store-sample-s", type=float, default=0.02, help="seconds between samples of the object stores")
    parser.add_argument("--drain-s", type=float, default=120.0, help="how long to wait for answers once all are sent; unanswered then: lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="the JSON result")
    args = parser.parse_args()
    for name in ("requests", "workers", "nodes", "cpus_per_node", "block_size", "device_blocks", "host_blocks", "prefixes", "max_queued_requests", "hidden_size", "layers", "kv_heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.rate > 0 or not args.sample_s > 0 or not args.store_sample_s > 0 or not args.drain_s > 0:
        parser.error("--rate, --sample-s, --store-sample-s and --drain-s must be > 0")
    if args.hidden_size % HEAD_DIM or (args.hidden_size // HEAD_DIM) % args.kv_heads:
        parser.error(f"--hidden-size must be a multiple of {HEAD_DIM} and --kv-heads must divide its {HEAD_DIM}-wide heads, got {args.hidden_size} and {args.kv_heads}")
    for name in ("cancel_fraction", "pull_fraction", "kill_at", "bad_at"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.workers < 2 and args.kill_at < 1:
        parser.error("a worker kill needs --workers >= 2 (its requests go to another), or --kill-at 1")
    return args


def main() -> int:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rayk-soak-") as work_dir:
        if args.model is None:
            args.vocab_size = args.vocab_size or 512
            model_dir = os.path.join(work_dir, "model")
            write_checkpoint(model_dir, args.vocab_size, args.hidden_size, args.layers, args.kv_heads)
        else:
            model_dir = args.model
            args.vocab_size = args.vocab_size or json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        requests = make_requests(args, np.random.default_rng(args.seed))
        nodes = RayTestCluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node, "include_dashboard": False})
        try:
            for _ in range(args.nodes - 1):
                nodes.add_node(num_cpus=args.cpus_per_node)
            nodes.wait_for_nodes()
            ray.init(address=nodes.address, namespace="rayk-soak", log_to_driver=False)
            stores = ObjectStores()
            baseline = stores.read()
            with rayk.Cluster(
                model_dir,
                num_workers=args.workers,
                namespace="rayk-soak",
                device="cpu",
                block_size=args.block_size,
                num_device_blocks=args.device_blocks,
                host_blocks=args.host_blocks,
                max_model_len=MAX_MODEL_LEN,
                max_queued_requests=args.max_queued_requests,
                liveness_timeout_s=2.0,
            ) as cluster:
                workers = cluster.workers()
                kill_pid = ray.get(cluster._worker("worker-1").info.remote())["pid"] if args.kill_at < 1 else 0
                outcomes = Outcomes()
                monitor, store_monitor = Monitor(cluster), StoreMonitor(stores)
                samplers = [Periodic("soak-monitor", args.sample_s, monitor.sample), Periodic("soak-store-monitor", args.store_sample_s, store_monitor.sample)]
                for sampler in samplers:
                    sampler.start()
                try:
                    load = run_load(cluster, requests, args, outcomes, kill_pid, before_kill=monitor.sample)
                finally:
                    for sampler in samplers:
                        sampler.close()
                monitor.sample()
                store_monitor.sample()
                drained = drained_state(cluster, workers, stores, baseline)
                after = cluster.generate([1, 2, 3, 4, 5], rayk.SamplingParams(temperature=0, max_tokens=4))[0]
            verified = verify(model_dir, requests, outcomes.outputs, args.verify, args.block_size)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            nodes.shutdown()
    counts = outcomes.counts
    answered = counts["completed"] + counts["refused"] + counts["cancelled"] + counts["failed"]
    result = {
        "config": vars(args),
        "environment": {
            "cpu_count": os.cpu_count(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "ray_cluster": f"ray.cluster_utils.Cluster, {args.nodes} nodes x {args.cpus_per_node} CPUs on 127.0.0.1",
        },
        "requests": {
            "sent": len(requests),
            "completed": counts["completed"],
            "refused": counts["refused"],
            "cancelled": counts["cancelled"],
            "failed": counts["failed"],
            "lost": len(requests) - answered,
        },
        "offered_rate": args.rate,
        "sent_rate": len(requests) / load["send_s"],  # the driver's own pace caps what it offers
        "served_rate": counts["completed"] / (load["send_s"] + load["drain_s"]),
        "errors": dict(outcomes.errors),
        "faults": load["faults"],
        "bad_inputs": load["bad_inputs"],
        "verified": verified,
        "forced_pulls": load["forced_pulls"],
        "transfers": monitor.transfers(),
        "peaks": dict(monitor.peaks) | {f"object_store_{key}": value for key, value in store_monitor.peaks.items()},
        "monitor_samples": samplers[0].samples,
        "store_samples": samplers[1].samples,
        "monitor_errors": dict(samplers[0].errors + samplers[1].errors),
        "baseline": baseline,
        "drained": drained,
        "served_after": len(after.token_ids) == 4,
        "wall_s": time.monotonic() - wall,
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    must_be_zero = {
        "lost": result["requests"]["lost"],
        "wrong tokens": verified["mismatched"],
        "leaked blocks": drained["leaked_blocks"],
        "requests left": drained["requests_left"] + drained["in_flight_left"],
        "unclear bad-input errors": sum(not x["clear"] for x in load["bad_inputs"]),
        "cached blocks after reset": drained["device_cached_after_reset"] + drained["host_cached_after_reset"],
        "object store above baseline": int(drained["object_store_bytes"] > baseline["bytes"] or drained["object_store_objects"] > baseline["objects"]),
        "requests in flight above the bound": max(0, monitor.peaks["in_flight"] - args.max_queued_requests),
        "no answer after the soak": int(not result["served_after"]),
    }
    broken = {k: v for k, v in must_be_zero.items() if v}
    if broken:
        print(f"FAILED: {broken}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
