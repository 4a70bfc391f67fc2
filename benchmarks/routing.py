"""Cluster routing policies on the same requests: cache hits against an oracle, TTFT, throughput, balance.

A multi-node rayk deployment (by default a ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes
on this machine, each with its own object store, bound to 127.0.0.1; with ``--address`` a real
Ray cluster) serves four workloads, each once per routing policy (``prefix``, ``prefix+pull``,
``round_robin``, ``least_loaded``, ``random``, passed per request), on exactly the same requests.
``prefix+pull`` is the prefix policy with route-or-pull (``pull="auto"``: a busy holder's request
may go to an idle worker that pulls the prefix from it); every other policy runs with
``pull="never"``, so ``prefix`` is routing to the cache alone.

1. ``shared-prefix``: SGLang bench_serving's "generated-shared-prefix": ``--groups`` x
   ``--prompts-per-group`` prompts, each a group's shared system prompt of ``--system-tokens``
   plus a unique question of ``--question-tokens``; shuffled; Poisson arrivals at
   ``--request-rate``.
2. ``chat``: ``--conversations`` conversations of ``--turns`` turns; every turn resends the whole
   history (previous prompt + previous output + a new user message); arrivals interleaved across
   conversations, and a turn goes out only after the previous turn of its conversation finished.
3. ``hot``: a skewed shared-prefix load: ``--hot-fraction`` of the requests share one hot system
   prompt, the rest spread over ``--groups`` - 1 cold ones (same token counts as ``shared-prefix``).
4. ``trace``: a Mooncake-format JSONL trace (``--trace``; ``{"timestamp": ms, "input_length": n,
   "output_length": m, "hash_ids": [...]}``), each hash id one block of ``--trace-block-tokens``
   deterministic tokens (Mooncake's blocks are 512 tokens; lengths are scaled by the same
   factor). Without ``--trace`` a small trace in that format is synthesized (a few prefixes with
   Zipf-like reuse), and the output says so. Timestamps are rescaled to ``--request-rate``.

Every workload runs at concurrency 1 (closed loop: the next request goes when the previous
finished) and at ``--concurrency`` (arrival times honored, at most that many in flight). Every
request is a token-id prompt, greedy, ``ignore_eos``; it is sent with ``Cluster.stream`` from
its own thread, so TTFT and latency are measured by the client's wall clock (from before the
driver hashes and routes it to its first / last token).

Workers' device pools are sized per workload. ``pressure``: the reused working set (distinct
full blocks that two or more requests hold) exceeds one worker's pool but fits all the workers'
pools together (``--pool-slack`` x the set, spread over the workers, plus room for the longest
request). ``unbounded``: every worker could hold everything the workload ever computes.

Reported per (pools, workload, concurrency, policy), medians of ``--repeats`` runs with the
order of the policies reversed on every other repeat, the cache emptied (and the coordinator's
directory seen empty) before each run:

- hit tokens (sum of ``num_cached_tokens``) against the oracle: for each request, the longest
  prefix of full blocks (never covering the last prompt token) it shares with any request sent
  before it (prompts; and the computed output of requests finished before it was sent);
- prompt tokens computed; client TTFT p50 / p99 and latency p50; requests/s and output tokens/s
  over the run's wall time; imbalance (max / mean over the workers) of requests served and of
  tokens computed; the router's own predicted against actual hit tokens (``stats()["routing"]``,
  the change over the run) and its replications (routes that put a hot prefix on one more
  worker); route-decision latency: ``Coordinator.route`` timed from the driver
  (the Ray round trip included) on a sample of the workload's prompts after each run.

Ratios against round_robin and against prefix are medians of the per-repeat paired ratios. Goals
(PASS/FAIL): ``prefix`` reaches >= 0.95 of the oracle's hit tokens with imbalance <= 1.3 under
pressure at both concurrencies; 1.00 with imbalance <= 1.1 with unbounded pools; at
``--concurrency``, >= 2x round_robin's throughput and >= 3x better TTFT p50. On ``hot`` at
``--concurrency``, ``prefix+pull`` has a TTFT p99 >= 2x better than ``prefix`` at >= its
throughput.

    python benchmarks/routing.py --quick
    python benchmarks/routing.py [--workloads shared-prefix chat trace] [--pools pressure unbounded] [--trace PATH] [--address ADDR]
"""

from __future__ import annotations

import os

# Before Ray is imported: Ray then binds every node it starts to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
import transformers
from ray.cluster_utils import Cluster as RayTestCluster
from transformers import LlamaConfig, LlamaForCausalLM

import rayk

RESULTS = Path(__file__).parent / "results" / "routing.json"
POLICIES = ("prefix", "prefix+pull", "round_robin", "least_loaded", "random")
WORKLOADS = ("shared-prefix", "chat", "hot", "trace")
POOLS = ("pressure", "unbounded")
MOONCAKE_BLOCK_TOKENS = 512
# Defaults of the full run; --quick replaces them (flags given explicitly always win).
FULL = {
    "groups": 16, "prompts_per_group": 8, "system_tokens": 512, "question_tokens": 32, "output_tokens": 8,
    "conversations": 12, "turns": 4, "chat_first_tokens": 256, "chat_turn_tokens": 32,
    "trace_requests": 96, "repeats": 5, "request_rate": 64.0, "route_samples": 64, "max_minutes": 40.0, "hot_fraction": 0.8,
}
QUICK = {
    "groups": 8, "prompts_per_group": 4, "system_tokens": 128, "question_tokens": 16, "output_tokens": 4,
    "conversations": 8, "turns": 3, "chat_first_tokens": 96, "chat_turn_tokens": 16,
    "trace_requests": 24, "repeats": 3, "request_rate": 64.0, "route_samples": 16, "max_minutes": 10.0, "hot_fraction": 0.8,
}


# -- requests and workloads ---------------------------------------------------------------------


@dataclass
class Request:
    """One request of a workload. ``tokens`` is the whole prompt, or for a chat turn
    (``conversation`` set) the new user message appended to the conversation's history."""

    index: int
    arrival_s: float
    tokens: list[int]
    max_tokens: int
    conversation: int | None = None


@dataclass
class Workload:
    name: str
    requests: list[Request]
    notes: list[str] = field(default_factory=list)


def _random_tokens(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return rng.integers(0, vocab_size, n).tolist()


def _poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> list[float]:
    """Arrival seconds of ``n`` requests at ``rate`` per second (all at 0 when rate is inf)."""
    if math.isinf(rate):
        return [0.0] * n
    return np.cumsum(rng.exponential(1.0 / rate, n)).tolist()


def shared_prefix_workload(args, vocab_size: int, rng: np.random.Generator) -> Workload:
    """SGLang's generated-shared-prefix: groups of prompts behind one system prompt each, shuffled."""
    prompts = []
    for _ in range(args.groups):
        system = _random_tokens(rng, args.system_tokens, vocab_size)
        prompts += [system + _random_tokens(rng, args.question_tokens, vocab_size) for _ in range(args.prompts_per_group)]
    order = rng.permutation(len(prompts))
    arrivals = _poisson_arrivals(rng, len(prompts), args.request_rate)
    requests = [Request(i, arrivals[i], prompts[j], args.output_tokens) for i, j in enumerate(order)]
    note = f"{args.groups} groups x {args.prompts_per_group} prompts, {args.system_tokens} + {args.question_tokens} tokens, {args.output_tokens} out"
    return Workload("shared-prefix", requests, [note])


def hot_workload(args, vocab_size: int, rng: np.random.Generator) -> Workload:
    """One hot system prompt behind ``hot_fraction`` of the requests, the rest over the cold ones."""
    total = args.groups * args.prompts_per_group
    systems = [_random_tokens(rng, args.system_tokens, vocab_size) for _ in range(max(2, args.groups))]
    num_hot = round(args.hot_fraction * total)
    owners = [0] * num_hot + [1 + i % (len(systems) - 1) for i in range(total - num_hot)]
    prompts = [systems[o] + _random_tokens(rng, args.question_tokens, vocab_size) for o in owners]
    order = rng.permutation(total)
    arrivals = _poisson_arrivals(rng, total, args.request_rate)
    requests = [Request(i, arrivals[i], prompts[j], args.output_tokens) for i, j in enumerate(order)]
    note = f"{num_hot} of {total} prompts behind one hot system prompt, the rest over {len(systems) - 1} others; {args.system_tokens} + {args.question_tokens} tokens, {args.output_tokens} out"
    return Workload("hot", requests, [note])


def chat_workload(args, vocab_size: int, rng: np.random.Generator) -> Workload:
    """Multi-turn chat: turn t of every conversation arrives before turn t + 1 of any, the
    conversations in a new order every turn (in a fixed order, round_robin would send every turn
    of a conversation to the same worker whenever the workers divide the conversations)."""
    requests = []
    arrivals = _poisson_arrivals(rng, args.conversations * args.turns, args.request_rate)
    for turn in range(args.turns):
        length = args.chat_first_tokens if turn == 0 else args.chat_turn_tokens
        for conversation in rng.permutation(args.conversations).tolist():
            index = len(requests)
            requests.append(Request(index, arrivals[index], _random_tokens(rng, length, vocab_size), args.output_tokens, conversation))
    note = (
        f"{args.conversations} conversations x {args.turns} turns, first message {args.chat_first_tokens} tokens, "
        f"then {args.chat_turn_tokens} per turn, {args.output_tokens} out; each turn resends the history"
    )
    return Workload("chat", requests, [note])


def synthesize_mooncake_trace(num_requests: int, rng: np.random.Generator) -> list[dict]:
    """Mooncake-format records: shared prefixes (chains of hash ids: documents, system prompts)
    picked with Zipf-like weights, most requests taking a whole prefix and some only its start,
    each followed by one to three blocks of its own."""
    num_prefixes = max(4, num_requests // 4)
    weights = 1.0 / np.arange(1, num_prefixes + 1) ** 0.8
    weights /= weights.sum()
    next_id = 0
    prefixes = []
    for _ in range(num_prefixes):
        length = int(rng.integers(4, 13))
        prefixes.append(list(range(next_id, next_id + length)))
        next_id += length
    records, timestamp_ms = [], 0
    for _ in range(num_requests):
        prefix = prefixes[rng.choice(num_prefixes, p=weights)]
        if rng.random() < 0.25:
            prefix = prefix[: int(rng.integers(2, len(prefix) + 1))]
        num_unique = int(rng.integers(1, 4))
        hash_ids = prefix + list(range(next_id, next_id + num_unique))
        next_id += num_unique
        # The last block is partly filled, as in a real trace.
        input_length = (len(hash_ids) - 1) * MOONCAKE_BLOCK_TOKENS + int(rng.integers(64, MOONCAKE_BLOCK_TOKENS + 1))
        records.append({"timestamp": timestamp_ms, "input_length": input_length, "output_length": int(rng.integers(64, 512)), "hash_ids": hash_ids})
        timestamp_ms += int(rng.exponential(500))
    return records


def read_mooncake_trace(path: str, limit: int) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = {"timestamp", "input_length", "output_length", "hash_ids"} - set(record)
            if missing:
                raise ValueError(f"{path}:{number}: a Mooncake record needs {sorted(missing)}")
            records.append(record)
            if len(records) == limit:
                break
    if not records:
        raise ValueError(f"{path} holds no Mooncake records")
    return records


def trace_workload(args, vocab_size: int, rng: np.random.Generator) -> Workload:
    """The trace's requests: one deterministic block of tokens per hash id (the same id, the same
    tokens), lengths scaled from Mooncake's 512-token blocks, times rescaled to --request-rate."""
    if args.trace:
        records = read_mooncake_trace(args.trace, args.trace_requests)
        notes = [f"trace {args.trace}: first {len(records)} records"]
    else:
        records = synthesize_mooncake_trace(args.trace_requests, rng)
        notes = [f"no --trace given: a synthesized Mooncake-format trace of {len(records)} records ({max(4, len(records) // 4)} prefixes, Zipf-like reuse)"]
    block = args.trace_block_tokens
    scale = block / MOONCAKE_BLOCK_TOKENS
    blocks: dict[int, list[int]] = {}
    start_ms = min(r["timestamp"] for r in records)
    span_s = (max(r["timestamp"] for r in records) - start_ms) / 1e3
    # Keep the trace's shape (its bursts and gaps) but give it --request-rate on average.
    time_scale = 0.0 if math.isinf(args.request_rate) or span_s == 0 else len(records) / args.request_rate / span_s
    requests = []
    for i, record in enumerate(sorted(records, key=lambda r: r["timestamp"])):
        tokens = []
        for hash_id in record["hash_ids"]:
            if hash_id not in blocks:
                blocks[hash_id] = _random_tokens(np.random.default_rng([args.seed, 7, int(hash_id)]), block, vocab_size)
            tokens += blocks[hash_id]
        length = max(1, round(record["input_length"] * scale))
        if length > len(tokens):  # a record whose hash ids do not cover its length: pad with its own tokens
            tokens += _random_tokens(np.random.default_rng([args.seed, 8, i]), length - len(tokens), vocab_size)
        max_tokens = max(1, min(record["output_length"], args.output_tokens))
        requests.append(Request(i, (record["timestamp"] - start_ms) / 1e3 * time_scale, tokens[:length], max_tokens))
    notes.append(f"{block} tokens per hash id (Mooncake: {MOONCAKE_BLOCK_TOKENS}); output capped at {args.output_tokens} tokens")
    return Workload("trace", requests, notes)


BUILDERS = {"shared-prefix": shared_prefix_workload, "chat": chat_workload, "hot": hot_workload, "trace": trace_workload}


# -- block keys, the oracle and the working set -------------------------------------------------


def chain_keys(token_ids: list[int], block_size: int) -> list[bytes]:
    """A key per full block, chained (a block's key names its whole prefix). The benchmark's own
    hash, independent of rayk's, so the oracle does not trust the thing it measures."""
    keys, previous = [], b""
    data = np.asarray(token_ids, dtype=np.int64).tobytes()
    step = 8 * block_size
    for i in range(len(token_ids) // block_size):
        previous = hashlib.blake2b(previous + data[i * step : (i + 1) * step], digest_size=16).digest()
        keys.append(previous)
    return keys


def cacheable_blocks(prompt_len: int, block_size: int) -> int:
    """Full blocks a request can be served from the cache: never the last prompt token."""
    return (prompt_len - 1) // block_size


def oracle_hits(records: list[dict], block_size: int) -> list[int]:
    """Per record (send order), the tokens of its longest full-block prefix shared with a request
    sent before it: its prompt, and its computed tokens (prompt + output but the last output
    token) once it finished before this one was sent."""
    events = [(r["send_s"], 1, i) for i, r in enumerate(records)] + [(r["done_s"], 0, i) for i, r in enumerate(records)]
    seen: set[bytes] = set()
    hits = [0] * len(records)
    for _, is_send, i in sorted(events):
        record = records[i]
        if is_send:
            keys = chain_keys(record["prompt"], block_size)[: cacheable_blocks(len(record["prompt"]), block_size)]
            matched = next((n for n, key in enumerate(keys) if key not in seen), len(keys))
            hits[i] = matched * block_size
            seen.update(chain_keys(record["prompt"], block_size))
        else:
            seen.update(chain_keys(record["prompt"] + record["output"][:-1], block_size))
    return hits


def planned_prompts(workload: Workload) -> list[list[int]]:
    """The prompts the workload will send, with stand-in tokens for chat outputs (only their
    count matters here: for sizing pools and max_model_len)."""
    histories: dict[int, list[int]] = {}
    prompts = []
    for request in workload.requests:
        if request.conversation is None:
            prompts.append(request.tokens)
            continue
        prompt = histories.get(request.conversation, []) + request.tokens
        prompts.append(prompt)
        stand_in = [(request.index * 7919 + k) % 1000 for k in range(request.max_tokens)]
        histories[request.conversation] = prompt + stand_in
    return prompts


def pool_sizes(workload: Workload, block_size: int, num_workers: int, concurrency: int, slack: float) -> dict:
    """Blocks per worker for each pool setting, and the working set they are sized from."""
    prompts = planned_prompts(workload)
    occurrences = Counter(key for prompt in prompts for key in set(chain_keys(prompt, block_size)))
    reused = sum(1 for n in occurrences.values() if n >= 2)
    longest = max(math.ceil((len(p) + r.max_tokens) / block_size) for p, r in zip(prompts, workload.requests))
    output_blocks = sum(math.ceil(r.max_tokens / block_size) + 1 for r in workload.requests)
    # Room for one of the longest requests on top of the worker's share of the reused set.
    pressure = math.ceil(slack * reused / num_workers) + longest
    # Everything the workload ever computes (an upper bound), plus the requests in flight.
    unbounded = len(occurrences) + output_blocks + concurrency * longest
    return {
        "distinct_blocks": len(occurrences),
        "reused_blocks": reused,
        "longest_request_blocks": longest,
        "pressure": pressure,
        "unbounded": unbounded,
        "pressure_holds": pressure < reused <= num_workers * pressure,
        "max_model_len": longest * block_size,
    }


# -- the model ----------------------------------------------------------------------------------


def write_checkpoint(directory: str, args) -> None:
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def model_vocab_size(model: str) -> int:
    config_path = Path(model) / "config.json"
    if not config_path.exists():
        raise SystemExit(f"--model {model}: no config.json there; pass --vocab-size for the random prompts")
    config = json.loads(config_path.read_text())
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """Finished requests of the whole benchmark, on stderr (tqdm when it imports)."""

    def __init__(self, total: int):
        self.total, self.done, self.label, self.closed = total, 0, "", False
        self.start = time.monotonic()
        self._lock = threading.Lock()
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._bar = None

    def describe(self, label: str) -> None:
        self.label = label
        if self._bar is not None:
            self._bar.set_description(label)
        else:
            self._draw()

    def update(self, n: int = 1) -> None:
        with self._lock:
            if self.closed:  # a request abandoned at the wall-clock cap, finishing late
                return
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.done == self.total or self.done % 8 == 0:
                self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // max(1, self.total)
        elapsed = time.monotonic() - self.start
        sys.stderr.write(f"\r{self.label[:48]:<48} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        with self._lock:
            self.closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


# -- one run: a workload through one policy at one concurrency ------------------------------------


class RunTimeout(Exception):
    pass


def run_workload(cluster, workload: Workload, policy: str, concurrency: int, deadline: float, progress: Progress) -> list[dict]:
    """Sends the workload's requests and returns one record per request, in send order.

    At concurrency 1 the next request goes when the previous finished (arrival times are not
    waited for); otherwise a request goes at its arrival time once fewer than ``concurrency``
    are in flight. A chat turn waits for the previous turn of its conversation, which later
    requests of other conversations may overtake. Each request streams from its own thread, so
    the first token's time is the client's.
    """
    condition = threading.Condition()
    pending = list(workload.requests)
    busy: set[int] = set()
    histories: dict[int, list[int]] = {}
    records: list[dict] = []
    errors: list[BaseException] = []
    in_flight = 0
    start = time.perf_counter()

    routing, pull = routing_and_pull(policy)

    def serve(request: Request, prompt: list[int], record: dict) -> None:
        nonlocal in_flight
        params = rayk.SamplingParams(temperature=0, max_tokens=request.max_tokens, ignore_eos=True)
        output = error = None
        try:
            for delta in cluster.stream(prompt, params, routing=routing, pull=pull):
                if "first_s" not in record and delta.new_token_ids:
                    record["first_s"] = time.perf_counter() - start
                if delta.finished:
                    output = delta.output
        except BaseException as exc:  # reaches the main thread, which stops the run
            error = exc
        with condition:
            record["done_s"] = time.perf_counter() - start
            in_flight -= 1
            if error is not None or output is None:
                errors.append(error or RuntimeError(f"request {request.index}: the stream ended without an output"))
            else:
                record.update(
                    output=output.token_ids,
                    cached=output.num_cached_tokens,
                    worker=output.worker,
                    remote=output.cached_tokens_by_tier["remote"],
                    worker_ttft_s=output.ttft_s,
                    worker_latency_s=output.latency_s,
                )
                if request.conversation is not None:
                    histories[request.conversation] = prompt + output.token_ids
                    busy.discard(request.conversation)
            condition.notify_all()
        progress.update()

    with condition:
        while pending or in_flight:
            if errors:
                raise errors[0]
            if time.monotonic() > deadline:
                raise RunTimeout(f"the wall-clock cap ran out with {len(pending)} requests unsent and {in_flight} in flight")
            now = time.perf_counter() - start
            ready = next((r for r in pending if r.conversation is None or r.conversation not in busy), None)
            if ready is None or in_flight >= concurrency:
                condition.wait(0.05)
                continue
            if concurrency > 1 and ready.arrival_s > now:
                condition.wait(min(0.05, ready.arrival_s - now))
                continue
            pending.remove(ready)
            prompt = ready.tokens if ready.conversation is None else histories.get(ready.conversation, []) + ready.tokens
            if ready.conversation is not None:
                busy.add(ready.conversation)
            record = {"index": ready.index, "prompt": prompt, "send_s": now}
            records.append(record)
            in_flight += 1
            threading.Thread(target=serve, args=(ready, prompt, record), daemon=True, name=f"request-{ready.index}").start()
        if errors:
            raise errors[0]
    return records


def routing_and_pull(policy: str) -> tuple[str, str]:
    """The routing policy and pull setting a benchmark policy name stands for."""
    return (policy.removesuffix("+pull"), "auto") if policy.endswith("+pull") else (policy, "never")


def route_latencies(cluster, prompts: list[list[int]], policy: str, samples: int) -> list[float]:
    """Seconds per ``Coordinator.route`` call from the driver, Ray round trip included, on the
    first ``samples`` prompts; each decision is then completed as failed, so no load stays behind."""
    coordinator = cluster._coordinator
    routing, pull = routing_and_pull(policy)
    seconds = []
    for prompt in prompts[:samples]:
        keys = cluster.block_hashes(prompt)
        request_id = f"route-probe-{uuid.uuid4().hex}"
        begin = time.perf_counter()
        ray.get(coordinator.route.remote(request_id, keys, len(prompt), routing, None, pull))
        seconds.append(time.perf_counter() - begin)
        ray.get(coordinator.complete.remote([(request_id, None)]))
    return seconds


def _counter_delta(after: dict, before: dict) -> dict:
    """The change of the router's counters (integer leaves, nested dicts) over a run; its ratios
    (float leaves) describe its whole life, so they are left out."""
    delta = {}
    for key, value in after.items():
        previous = before.get(key) if isinstance(before, dict) else None
        if isinstance(value, dict):
            delta[key] = _counter_delta(value, previous or {})
        elif isinstance(value, int) and not isinstance(value, bool):
            delta[key] = value - (previous or 0)
    return delta


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _imbalance(counts: dict[str, float], workers: list[str]) -> float | None:
    values = [counts.get(w, 0) for w in workers]
    mean = sum(values) / len(values)
    return max(values) / mean if mean else None


def summarize(records: list[dict], block_size: int, workers: list[str], routing_delta: dict, route_s: list[float]) -> dict:
    oracle = oracle_hits(records, block_size)
    prompt_tokens = sum(len(r["prompt"]) for r in records)
    hit = sum(r["cached"] for r in records)
    output_tokens = sum(len(r["output"]) for r in records)
    wall_s = max(r["done_s"] for r in records) - min(r["send_s"] for r in records)
    served = Counter(r["worker"] for r in records)
    computed: Counter = Counter()
    for r in records:
        computed[r["worker"]] += len(r["prompt"]) - r["cached"]
    ttft = [r["first_s"] - r["send_s"] for r in records]
    latency = [r["done_s"] - r["send_s"] for r in records]
    worker_ttft = [r["worker_ttft_s"] for r in records if r["worker_ttft_s"] is not None]
    return {
        "requests": len(records),
        "prompt_tokens": prompt_tokens,
        "hit_tokens": hit,
        "remote_hit_tokens": sum(r["remote"] for r in records),
        "oracle_tokens": sum(oracle),
        "hit_vs_oracle": hit / sum(oracle) if sum(oracle) else None,
        "requests_over_oracle": sum(r["cached"] > o for r, o in zip(records, oracle)),
        "computed_tokens": prompt_tokens - hit,
        "output_tokens": output_tokens,
        "wall_s": wall_s,
        "requests_per_s": len(records) / wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "latency_p50_s": _percentile(latency, 50),
        "latency_p99_s": _percentile(latency, 99),
        "worker_ttft_p50_s": _percentile(worker_ttft, 50),
        "worker_ttft_p99_s": _percentile(worker_ttft, 99),
        "requests_by_worker": dict(served),
        "computed_tokens_by_worker": dict(computed),
        "imbalance_requests": _imbalance(served, workers),
        "imbalance_computed_tokens": _imbalance(computed, workers),
        "routing": routing_delta,
        # The router's own account of the same requests: what it predicted at each decision (for
        # the requests that completed), the hits the workers reported, and its directory's oracle.
        "router_predicted_hit_tokens": routing_delta.get("completed_predicted_hit_tokens"),
        "router_actual_hit_tokens": routing_delta.get("actual_hit_tokens"),
        "router_oracle_hit_tokens": routing_delta.get("oracle_hit_tokens"),
        "router_exact_predictions": routing_delta.get("exact_predictions"),
        "replications": routing_delta.get("replications"),
        "route_p50_s": _percentile(route_s, 50),
        "route_p99_s": _percentile(route_s, 99),
    }


def empty_caches(cluster, timeout_s: float = 30.0) -> None:
    """Every worker's tiers emptied, and the coordinator's directory seen empty."""
    cluster.reset_prefix_cache()
    deadline = time.monotonic() + timeout_s
    while True:
        directory = cluster.stats()["directory"]
        if not directory["blocks"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the directory still holds {directory['workers']} blocks {timeout_s} s after reset_prefix_cache()")
        time.sleep(0.02)


# -- one deployment: a workload, one pool setting, every policy, both concurrencies -------------


def bench_deployment(model_dir: str, workload: Workload, pools: str, sizes: dict, args, progress: Progress, deadline: float, runs: list[dict]) -> None:
    """Starts a deployment sized for ``workload`` and ``pools`` and appends one summary per run
    to ``runs`` (so that what finished survives an error or the wall-clock cap)."""
    if time.monotonic() > deadline:
        raise RunTimeout(f"not started: {pools} {workload.name}")
    namespace = f"{args.namespace}-{workload.name}-{pools}"
    num_blocks = sizes[pools]
    with rayk.Cluster(
        model_dir,
        num_workers=args.workers,
        namespace=namespace,
        block_size=args.block_size,
        num_device_blocks=num_blocks,
        max_model_len=sizes["max_model_len"],
        routing="prefix",
        device=args.device,
    ) as cluster:
        workers = cluster.workers()
        warm_up = rayk.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for worker in workers:  # first calls are slow everywhere (allocations, lazy imports)
            cluster.generate(workload.requests[0].tokens[: 2 * args.block_size + 1], warm_up, worker=worker)
        prompts = planned_prompts(workload)
        for repeat in range(args.repeats):
            order = list(args.policies) if repeat % 2 == 0 else list(reversed(args.policies))
            for concurrency in sorted({1, args.concurrency}):
                for policy in order:
                    progress.describe(f"{pools} {workload.name} c={concurrency} {policy} #{repeat + 1}")
                    empty_caches(cluster)
                    before = cluster.stats()["routing"]
                    records = run_workload(cluster, workload, policy, concurrency, deadline, progress)
                    routing_delta = _counter_delta(cluster.stats()["routing"], before)
                    route_s = route_latencies(cluster, prompts, policy, args.route_samples)
                    summary = summarize(records, args.block_size, workers, routing_delta, route_s)
                    runs.append(
                        {"pools": pools, "workload": workload.name, "concurrency": concurrency, "policy": policy, "repeat": repeat, **summary}
                    )


# -- medians, ratios, goals, output -------------------------------------------------------------

MEDIAN_KEYS = (
    "hit_tokens", "remote_hit_tokens", "oracle_tokens", "hit_vs_oracle", "computed_tokens", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
    "worker_ttft_p50_s", "requests_per_s", "output_tokens_per_s", "imbalance_requests", "imbalance_computed_tokens",
    "router_predicted_hit_tokens", "router_actual_hit_tokens", "router_oracle_hit_tokens", "route_p50_s", "route_p99_s", "replications",
)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(runs: list[dict]) -> list[dict]:
    """Per (pools, workload, concurrency, policy): the medians over repeats, and against
    round_robin the medians of the per-repeat paired ratios."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["pools"], run["workload"], run["concurrency"], run["policy"]), []).append(run)
    rows = []
    for (pools, workload, concurrency, policy), group in groups.items():
        row = {"pools": pools, "workload": workload, "concurrency": concurrency, "policy": policy, "repeats": len(group)}
        row.update({k: _median([r[k] for r in group]) for k in MEDIAN_KEYS})
        baseline = {r["repeat"]: r for r in groups.get((pools, workload, concurrency, "round_robin"), [])}
        pairs = [(r, baseline[r["repeat"]]) for r in group if r["repeat"] in baseline]
        row["throughput_vs_round_robin"] = _median([r["requests_per_s"] / b["requests_per_s"] for r, b in pairs]) if pairs else None
        row["ttft_p50_speedup_vs_round_robin"] = _median([b["ttft_p50_s"] / r["ttft_p50_s"] for r, b in pairs]) if pairs else None
        row["hit_tokens_vs_round_robin"] = _median([r["hit_tokens"] / b["hit_tokens"] if b["hit_tokens"] else None for r, b in pairs]) if pairs else None
        prefix = {r["repeat"]: r for r in groups.get((pools, workload, concurrency, "prefix"), [])}
        pairs = [(r, prefix[r["repeat"]]) for r in group if r["repeat"] in prefix]
        row["throughput_vs_prefix"] = _median([r["requests_per_s"] / b["requests_per_s"] for r, b in pairs]) if pairs else None
        row["ttft_p99_speedup_vs_prefix"] = _median([b["ttft_p99_s"] / r["ttft_p99_s"] for r, b in pairs]) if pairs else None
        rows.append(row)
    return rows


def goals(rows: list[dict], saturating: int) -> list[dict]:
    """PASS/FAIL of each goal on the prefix policy's medians."""
    checks = []
    for row in rows:
        if row["policy"] == "prefix+pull" and row["workload"] == "hot" and row["concurrency"] == saturating and saturating > 1:
            where = {"pools": row["pools"], "workload": row["workload"], "concurrency": row["concurrency"]}
            for goal, value, bound in (
                ("prefix+pull TTFT p99 >= 2x better than prefix", row["ttft_p99_speedup_vs_prefix"], 2.0),
                ("prefix+pull throughput >= prefix", row["throughput_vs_prefix"], 1.0),
            ):
                checks.append({**where, "goal": goal, "value": value, "pass": value is not None and value >= bound})
        if row["policy"] != "prefix":
            continue
        where = {"pools": row["pools"], "workload": row["workload"], "concurrency": row["concurrency"]}
        imbalance = max(v for v in (row["imbalance_requests"], row["imbalance_computed_tokens"]) if v is not None)
        if row["pools"] == "pressure":
            wanted = [("hit / oracle >= 0.95", row["hit_vs_oracle"], 0.95, True), ("imbalance <= 1.3", imbalance, 1.3, False)]
        else:
            wanted = [("hit / oracle = 1.00", row["hit_vs_oracle"], 0.995, True), ("imbalance <= 1.1", imbalance, 1.1, False)]
        if row["concurrency"] == saturating and saturating > 1:
            wanted += [
                ("throughput >= 2x round_robin", row["throughput_vs_round_robin"], 2.0, True),
                ("TTFT p50 >= 3x better than round_robin", row["ttft_p50_speedup_vs_round_robin"], 3.0, True),
            ]
        for goal, value, bound, at_least in wanted:
            passed = value is not None and (value >= bound if at_least else value <= bound)
            checks.append({**where, "goal": goal, "value": value, "pass": passed})
    return checks


def _fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_tables(rows: list[dict], checks: list[dict]) -> None:
    print("| pools | workload | conc | policy | hit/oracle | hit tok | oracle tok | computed tok | TTFT p50 ms | TTFT p99 ms | "
          "req/s | out tok/s | imbal req | imbal tok | router pred/actual hit | route p50/p99 ms | vs rr: thr, TTFT | remote tok | replicas | vs prefix: thr, TTFT p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        router = f"{_fmt(r['router_predicted_hit_tokens'], '.0f')} / {_fmt(r['router_actual_hit_tokens'], '.0f')}"
        route = f"{_fmt(r['route_p50_s'], '.2f', 1e3)} / {_fmt(r['route_p99_s'], '.2f', 1e3)}"
        versus = f"{_fmt(r['throughput_vs_round_robin'])}x, {_fmt(r['ttft_p50_speedup_vs_round_robin'])}x"
        print(
            f"| {r['pools']} | {r['workload']} | {r['concurrency']} | {r['policy']} | {_fmt(r['hit_vs_oracle'])} | "
            f"{_fmt(r['hit_tokens'], '.0f')} | {_fmt(r['oracle_tokens'], '.0f')} | {_fmt(r['computed_tokens'], '.0f')} | "
            f"{_fmt(r['ttft_p50_s'], '.1f', 1e3)} | {_fmt(r['ttft_p99_s'], '.1f', 1e3)} | {_fmt(r['requests_per_s'])} | "
            f"{_fmt(r['output_tokens_per_s'], '.1f')} | {_fmt(r['imbalance_requests'])} | {_fmt(r['imbalance_computed_tokens'])} | "
            f"{router} | {route} | {versus} | {_fmt(r['remote_hit_tokens'], '.0f')} | {_fmt(r['replications'], '.0f')} | "
            f"{_fmt(r['throughput_vs_prefix'])}x, {_fmt(r['ttft_p99_speedup_vs_prefix'])}x |"
        )
    print("\nGoals (prefix policy, medians):\n")
    print("| pools | workload | conc | goal | value | result |")
    print("|---|---|---|---|---|---|")
    for c in checks:
        print(f"| {c['pools']} | {c['workload']} | {c['concurrency']} | {c['goal']} | {_fmt(c['value'])} | {'PASS' if c['pass'] else 'FAIL'} |")


# -- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes on a 2-core machine")
    parser.add_argument("--address", default=None, help="run on this Ray cluster instead of starting local nodes")
    parser.add_argument("--nodes", type=int, default=2, help="local Ray nodes, each with its own object store")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per local node")
    parser.add_argument("--object-store-mb", type=int, default=256, help="object store of each local node")
    parser.add_argument("--namespace", default="rayk-bench-routing")
    parser.add_argument("--workers", type=int, default=4, help="rayk cache workers")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="workers' device (auto: a GPU each when the cluster has them)")
    parser.add_argument("--model", default=None, help="a local Hugging Face directory (default: a random Llama written to a temp dir)")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary of the random model, and of the prompts' token ids")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS), help="device pool settings to run")
    parser.add_argument("--unbounded", action="store_const", dest="pools", const=["unbounded"], help="only the unbounded pools (= --pools unbounded)")
    parser.add_argument("--pool-slack", type=float, default=1.5, help="under pressure, all pools together hold this many times the reused set")
    parser.add_argument("--concurrency", type=int, default=16, help="the saturating concurrency (also run: 1)")
    parser.add_argument(
        "--request-rate", type=float, default=None,
        help="Poisson arrivals per second; above the cluster's capacity, so that the cap paces the saturating runs (inf: all at once)",
    )
    parser.add_argument("--output-tokens", type=int, default=None, help="new tokens per request (the trace's are capped at this)")
    parser.add_argument("--groups", type=int, default=None)
    parser.add_argument("--hot-fraction", type=float, default=None, help="share of the 'hot' workload's requests behind its hot prefix")
    parser.add_argument("--prompts-per-group", type=int, default=None)
    parser.add_argument("--system-tokens", type=int, default=None)
    parser.add_argument("--question-tokens", type=int, default=None)
    parser.add_argument("--conversations", type=int, default=None)
    parser.add_argument("--turns", type=int, default=None)
    parser.add_argument("--chat-first-tokens", type=int, default=None, help="tokens of a conversation's first message")
    parser.add_argument("--chat-turn-tokens", type=int, default=None, help="tokens of every later user message")
    parser.add_argument("--trace", default=None, help="a Mooncake-format JSONL trace (default: synthesize one)")
    parser.add_argument("--trace-requests", type=int, default=None, help="records of the trace to replay (its first ones)")
    parser.add_argument("--trace-block-tokens", type=int, default=16, help="tokens per trace hash id (Mooncake's are 512)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per policy; medians are reported")
    parser.add_argument("--route-samples", type=int, default=None, help="route decisions timed after each run")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap: stop, report what finished")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (default: benchmarks/results/routing.json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    positive = ("nodes", "cpus_per_node", "workers", "block_size", "concurrency", "output_tokens", "groups", "prompts_per_group",
                "system_tokens", "question_tokens", "conversations", "turns", "chat_first_tokens", "chat_turn_tokens",
                "trace_requests", "trace_block_tokens", "repeats", "hidden_size", "layers")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.request_rate <= 0 or args.pool_slack <= 0 or args.max_minutes <= 0 or args.route_samples < 0:
        parser.error("--request-rate, --pool-slack and --max-minutes must be > 0, --route-samples >= 0")
    if not 0 <= args.hot_fraction <= 1:
        parser.error(f"--hot-fraction must be in [0, 1], got {args.hot_fraction}")
    if "round_robin" not in args.policies:
        args.policies.append("round_robin")  # the baseline of every ratio
    args.pools = list(dict.fromkeys(args.pools))
    return args


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    deadline = time.monotonic() + 60 * args.max_minutes
    rng = np.random.default_rng(args.seed)
    ray_nodes = None
    runs: list[dict] = []
    failures: list[dict] = []
    stopped = None
    with tempfile.TemporaryDirectory(prefix="rayk-routing-") as work_dir:
        if args.model is None:
            args.vocab_size = args.vocab_size or 1024
            model_dir = os.path.join(work_dir, "model")
            write_checkpoint(model_dir, args)
        else:
            model_dir = args.model
            args.vocab_size = args.vocab_size or model_vocab_size(model_dir)
        workloads = [BUILDERS[name](args, args.vocab_size, rng) for name in args.workloads]
        sizes = {w.name: pool_sizes(w, args.block_size, args.workers, args.concurrency, args.pool_slack) for w in workloads}
        for w in workloads:
            s = sizes[w.name]
            print(f"{w.name}: {len(w.requests)} requests; " + "; ".join(w.notes))
            print(
                f"  working set {s['distinct_blocks']} distinct blocks, {s['reused_blocks']} reused; blocks per worker: "
                f"pressure {s['pressure']} (x{args.workers} = {args.workers * s['pressure']}), unbounded {s['unbounded']}"
                + ("" if s["pressure_holds"] else "  WARNING: under 'pressure' the reused set fits one worker's pool")
            )
        total = len(args.pools) * sum(len(w.requests) for w in workloads) * args.repeats * len(args.policies) * len({1, args.concurrency})
        try:
            if args.address is None:
                ray_nodes = RayTestCluster(
                    initialize_head=True,
                    head_node_args={"num_cpus": args.cpus_per_node, "object_store_memory": args.object_store_mb << 20, "include_dashboard": False},
                )
                for _ in range(args.nodes - 1):
                    ray_nodes.add_node(num_cpus=args.cpus_per_node, object_store_memory=args.object_store_mb << 20)
                ray_nodes.wait_for_nodes()
                ray.init(address=ray_nodes.address, namespace=args.namespace, log_to_driver=False)
            else:
                ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
            progress = Progress(total)
            try:
                for pools in args.pools:
                    for workload in workloads:
                        try:
                            bench_deployment(model_dir, workload, pools, sizes[workload.name], args, progress, deadline, runs)
                        except RunTimeout:
                            raise
                        except Exception as error:  # a failed deployment is reported; the others still run
                            failures.append({"pools": pools, "workload": workload.name, "error": repr(error), "traceback": traceback.format_exc()})
                            sys.stderr.write(f"\n{pools} {workload.name} failed:\n{traceback.format_exc()}")
            except RunTimeout as error:
                stopped = str(error)
            finally:
                progress.close()
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if ray_nodes is not None:
                ray_nodes.shutdown()

    rows = aggregate(runs)
    checks = goals(rows, args.concurrency)
    print()
    print_tables(rows, checks)
    if stopped:
        print(f"\nSTOPPED EARLY at the {args.max_minutes}-minute cap: {stopped}; the tables hold only the finished runs")
    for failure in failures:
        print(f"\nFAILED: {failure['pools']} {failure['workload']}: {failure['error'].splitlines()[0][:300]} (traceback in the JSON)")
    environment = {
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "ray_cluster": args.address or f"ray.cluster_utils.Cluster, {args.nodes} nodes x {args.cpus_per_node} CPUs on 127.0.0.1",
    }
    result = {
        "config": vars(args),
        "environment": environment,
        "workloads": {w.name: {"requests": len(w.requests), "notes": w.notes, "pool_sizes": sizes[w.name]} for w in workloads},
        "stopped_early": stopped,
        "failures": failures,
        "medians": rows,
        "goals": checks,
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.results}")
    if failures or stopped:
        sys.exit(1)


if __name__ == "__main__":
    main()
