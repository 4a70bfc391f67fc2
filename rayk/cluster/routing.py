"""Routing: which worker serves a request, by the estimated work it costs there.

Plain Python (no Ray): the coordinator forwards to a ``Router``, which reads a ``PrefixDirectory``.

The ``prefix`` policy's cost of serving a request on worker ``w``, in prompt tokens of prefill:

    cost(w)     = uncached(w) + queue_weight * queued(w)
    uncached(w) = num_tokens - block_size * sum_t blocks_t(w) * (1 - tier_costs[t])
    queued(w)   = reported queued_prefill_tokens
                  + prefill of requests routed to w that it has not reported receiving
                  + decode_tokens_per_request * (running + waiting + unreported requests)

``blocks_t(w)`` are the request's leading blocks ``w`` holds, by best tier (device, pending,
host, disk); a hit never covers the last prompt token, as in the engine. ``tier_costs`` price a
cached token as a fraction of a computed one: a device or pending hit is free, a host or disk hit
costs its copy. ``queue_weight`` (< 1) says a token of queued work delays a request less than a
token it must compute itself (continuous batching overlaps them), and keeps a prefix group on its
worker through momentary load instead of computing the prefix twice. A pending hit also takes its
tokens off the worker's queued work (down to none): that work computes the very blocks the
request would wait for, and compute itself on any other worker, so it is no reason to go
elsewhere. The minimum wins; exact ties rotate, so load spreads.

A request whose first block no worker holds *seeds* a prefix: it goes to the worker holding the
fewest prefixes (distinct first keys in device or pending, per the directory) among those whose
cost is within one full prefill (``num_tokens``) of the least. Members that follow go to the
prefix's worker (a hit is cheaper than a miss elsewhere), so prefix groups spread evenly over the
workers and their caches add up, at any concurrency: with every worker idle (concurrency 1) the
prefixes held alone decide, and under load the slack keeps a momentary queue from deciding where
a prefix group will live.
What decides is what the workers hold now, not how prefixes were routed before: a cleared cache,
an eviction, a worker that joins later or requests sent with another policy leave no history.

*Hot prefixes* are replicated. The router counts recent routes per first key and per worker,
each route weighing half as much ``share_half_life`` routes later. A prefix gains a holder (a
worker with its first key in device or pending) when it alone is worth a worker, that is its
share of recent routes is at least ``1 / n`` over ``n`` routable workers and it has at least
``MIN_REPLICA_REQUESTS`` recent routes, and even its least loaded holder has taken more than
``REPLICA_MARGIN`` times the mean of recent routes per worker. Then, if some worker stores the
prefix (a prefix still pending keeps its burst together), its request goes to the cheapest
worker that does not hold it (pulling the prefix when route-or-pull credits that, computing it
otherwise), unless that costs more than one full prefill above the cheapest worker (the seeding
slack again). Without this, every request of a hot prefix goes to its one holder while the
others idle (at concurrency 1, all of them do); load alone spreads it only once the holder's
queue outweighs a whole prefill. The thresholds keep the noise of a few requests from copying
prefixes of an even workload.

*Pending* blocks: a routed request's keys beyond the chosen worker's hit are claimed pending on
it in the directory (as good as a device hit), so the rest of a burst sharing a new prefix follows
the first request before the worker has reported anything. A claim ends when the worker stores
the key, when the request fails, when the worker is removed, or ``pending_ttl_s`` after the
route. A request that completes keeps its claims for ``completed_claim_s`` more (or until the
TTL, if sooner): it may finish before its worker's next event batch says where its blocks went,
and the next member of its group must still find them. ``expire_claims`` ends the claims whose
time is up; ``route`` calls it. ``worker_cleared`` ends a worker's claims of completed requests
at once, when its device pool was emptied. The same TTL bounds a routed request's prefill counted
as unreported work: a request its worker never reports receiving (its driver died before sending
it) stops loading that worker after ``pending_ttl_s``.

``choose`` is the decision alone (match and scoring, nothing recorded); ``route`` is ``choose``
plus the pending claims and the bookkeeping below.

Route-or-pull (``pull``, per router and per request). The longest run of a request's blocks
that a routable worker *stores* (pending blocks are not there yet) may be pulled by another
worker. With ``"auto"`` the ``prefix`` policy also credits the least loaded worker, and any
worker holding part of the run, with the prefill a pull would save: the pulled tokens x (1 -
that worker's ``WorkerLoad.pull_cost()``, ``default_pull_cost`` until measured) minus
``pull_overhead_tokens``. When that makes it the cheapest, the decision carries a ``FetchPlan``
(the source and the keys to pull), and the pulled keys are claimed pending on it like any
other. ``"always"`` plans whenever another worker stores more of the run than the chosen one;
``"never"`` never plans. A plan is a hint: a worker that fails to pull computes the tokens.

Baselines: ``round_robin``, ``least_loaded`` (least queued work, unreported included),
``random`` (seeded). Every decision records its predicted hit and the oracle (the largest hit any
routable worker could give, per the directory); ``complete`` records the actual hit. In-flight
bookkeeping holds only requests that have neither completed nor failed.

Backpressure: with ``max_queued_requests`` set, the router keeps at most that many requests in
flight (routed, neither completed nor failed), across all workers and drivers; ``route`` refuses
the next one with ``Overloaded`` before it records anything. The in-flight count is exact here
(the router adds a request when it routes it), so the bound is never exceeded; a request leaves
it when its driver reports it done, or when its worker is removed.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import contains, eq, le, sub
from typing import NamedTuple

from rayk.cluster.directory import MATCH_TIERS, BlocksByTier, PrefixDirectory
from rayk.hashing import BlockHash
from rayk.overload import Overloaded, check_max_queued_requests

DEFAULT_TIER_COSTS = {"device": 0.0, "pending": 0.0, "host": 0.1, "disk": 0.3}
"""Cost of serving a token from each tier, as a fraction of computing it (a miss costs 1)."""

REPLICA_MARGIN = 1.1
"""A hot prefix gains a holder while its least loaded holder takes more than this many times
the mean of recent routes per worker."""

MIN_REPLICA_REQUESTS = 8.0
"""Recent routes (decayed) a prefix needs before it is replicated."""


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker reports with each event batch (requests and prompt tokens), and the rates
    it measured (tokens per second; 0.0 while it has measured none)."""

    num_waiting: int = 0
    num_running: int = 0
    queued_prefill_tokens: int = 0
    free_blocks: int = 0
    prefill_tokens_per_s: float = 0.0
    pull_tokens_per_s: float = 0.0
    """Tokens of KV a pull from a peer brings per second, the whole call included."""

    def __post_init__(self):
        for name in ("num_waiting", "num_running", "queued_prefill_tokens", "free_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"WorkerLoad.{name} must be an int >= 0, got {value!r}")
        for name in ("prefill_tokens_per_s", "pull_tokens_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"WorkerLoad.{name} must be a number >= 0 (tokens per second), got {value!r}")

    def pull_cost(self) -> float | None:
        """What a token pulled from a peer costs this worker, as a fraction of computing it
        (its prefill rate over its pull rate); None until it has measured both."""
        if self.prefill_tokens_per_s > 0 and self.pull_tokens_per_s > 0:
            return self.prefill_tokens_per_s / self.pull_tokens_per_s
        return None


@dataclass(frozen=True)
class FetchPlan:
    """Blocks the chosen worker pulls from a peer before serving a request: ``keys`` (a run of
    the request's chain, in order) from ``source``."""

    source: str
    keys: tuple[BlockHash, ...]


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes, and what the router expects there (tokens)."""

    request_id: str
    worker_id: str
    policy: str
    predicted_hit_tokens: int
    predicted_hit_by_tier: dict[str, int]
    oracle_hit_tokens: int
    estimated_cost_tokens: float
    """The chosen worker's cost: uncached prefill (tier-weighted) + queue_weight * queued work."""
    plan: FetchPlan | None = None
    """Blocks to pull from a peer first (their tokens are in ``predicted_hit_by_tier['remote']``)."""


class _WorkerState:
    """What the router knows of one worker; ``queued`` is in tokens (see the module doc)."""

    __slots__ = ("load", "unreported", "unreported_tokens")

    def __init__(self):
        self.load = WorkerLoad()
        self.unreported: dict[str, float] = {}  # request id -> estimated prefill tokens
        self.unreported_tokens = 0.0

    def take_unreported(self, request_id: str) -> bool:
        """Stops counting a request's prefill as unreported (its worker has it, or never will);
        False if it was not counted."""
        tokens = self.unreported.pop(request_id, None)
        if tokens is None:
            return False
        self.unreported_tokens = self.unreported_tokens - tokens if self.unreported else 0.0  # no float drift
        return True

    def queued(self, decode_tokens_per_request: float) -> float:
        load = self.load
        requests = load.num_running + load.num_waiting + len(self.unreported)
        return load.queued_prefill_tokens + self.unreported_tokens + decode_tokens_per_request * requests


class _InFlight(NamedTuple):
    worker_id: str
    predicted_hit_tokens: int


class _Claim(NamedTuple):
    """A request's pending keys on its worker, until ``deadline`` (seconds, monotonic)."""

    worker_id: str
    keys: Sequence[BlockHash]
    deadline: float


_NO_HIT = BlocksByTier()
_SHARE_RESCALE_AT = 2.0**64
_SHARE_FORGOTTEN = 2.0**-20  # a decayed count below this many requests is dropped at a rescale


class RouteChoice(NamedTuple):
    """A worker for a request and what it holds of it (blocks), before anything is recorded."""

    worker_id: str
    hit: BlocksByTier
    oracle_blocks: int  # the largest hit any routable worker holds; 0: the request seeds a prefix
    saved_tokens: float  # prefill the chosen worker's hit (and pull) saves (tier-weighted tokens)
    plan: FetchPlan | None = None
    lacked_blocks: int = 0  # blocks a peer holds beyond the chosen worker's hit
    replicates: bool = False  # chosen to hold a hot prefix it lacks (see the module doc)


class Router:
    """Routes requests over the workers added to it, reading ``directory`` (see module doc)."""

    POLICIES = ("prefix", "round_robin", "least_loaded", "random")
    PULLS = ("auto", "always", "never")

    def __init__(
        self,
        directory: PrefixDirectory,
        block_size: int,
        policy: str = "prefix",
        *,
        seed: int = 0,
        tier_costs: Mapping[str, float] | None = None,
        pending_ttl_s: float = 10.0,
        completed_claim_s: float = 1.0,
        queue_weight: float = 0.25,
        decode_tokens_per_request: float = 4.0,
        pull: str = "auto",
        default_pull_cost: float = 0.2,
        pull_overhead_tokens: float = 64.0,
        share_half_life: int = 128,
        replicate_hot_prefixes: bool = True,
        max_queued_requests: int | None = None,
    ):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"Router.block_size must be an int >= 1 (tokens), got {block_size!r}")
        _check_policy(policy)
        costs = dict(DEFAULT_TIER_COSTS if tier_costs is None else tier_costs)
        if sorted(costs) != sorted(MATCH_TIERS) or not all(0.0 <= c <= 1.0 for c in costs.values()):
            raise ValueError(f"Router.tier_costs must map each of {MATCH_TIERS} to a fraction in [0, 1], got {costs}")
        if not pending_ttl_s > 0:
            raise ValueError(f"Router.pending_ttl_s must be > 0 (seconds), got {pending_ttl_s!r}")
        if not completed_claim_s >= 0:
            raise ValueError(f"Router.completed_claim_s must be >= 0 (seconds), got {completed_claim_s!r}")
        if not 0 <= queue_weight <= 1:
            raise ValueError(f"Router.queue_weight must be in [0, 1], got {queue_weight!r}")
        if not decode_tokens_per_request >= 0:
            raise ValueError(f"Router.decode_tokens_per_request must be >= 0 (tokens), got {decode_tokens_per_request!r}")
        check_pull(pull)
        if not 0 <= default_pull_cost <= 1:
            raise ValueError(f"Router.default_pull_cost must be in [0, 1], got {default_pull_cost!r}")
        if not pull_overhead_tokens >= 0:
            raise ValueError(f"Router.pull_overhead_tokens must be >= 0 (tokens), got {pull_overhead_tokens!r}")
        self.directory = directory
        self.block_size = block_size
        self.policy = policy
        self.pending_ttl_s = float(pending_ttl_s)
        self.completed_claim_s = float(completed_claim_s)
        self.queue_weight = float(queue_weight)
        self.decode_tokens_per_request = float(decode_tokens_per_request)
        self.pull = pull
        self.default_pull_cost = float(default_pull_cost)
        self.pull_overhead_tokens = float(pull_overhead_tokens)
        if isinstance(share_half_life, bool) or not isinstance(share_half_life, int) or share_half_life < 1:
            raise ValueError(f"Router.share_half_life must be an int >= 1 (routes), got {share_half_life!r}")
        if not isinstance(replicate_hot_prefixes, bool):
            raise ValueError(f"Router.replicate_hot_prefixes must be True or False, got {replicate_hot_prefixes!r}")
        self.max_queued_requests = check_max_queued_requests(max_queued_requests)
        self.share_half_life = share_half_life
        self.replicate_hot_prefixes = replicate_hot_prefixes
        # Recent routes per first key (and per worker, in _recent_routes): each route adds the
        # current weight, which grows by 2 ** (1 / share_half_life) per route, so a count / the
        # weight is a decayed count.
        self._shares: dict[BlockHash, float] = {}
        self._share_weight = 1.0
        self._share_total = 0.0
        self._share_growth = 2.0 ** (1.0 / share_half_life)
        # Tokens a cached block saves against a miss, per tier, in BlocksByTier order.
        self._saved_per_block = tuple(block_size * (1.0 - costs[tier]) for tier in MATCH_TIERS)
        self._random = random.Random(seed)
        # Routable workers in a fixed order, and per worker (same index) queue_weight * queued
        # tokens and the directory's set of prefixes it holds: plain lists, so scoring every
        # worker runs at C speed.
        self._order: list[str] = []
        self._index: dict[str, int] = {}
        self._queue_costs: list[float] = []
        self._pull_costs: list[float] = []  # a pulled token's cost as a fraction of a computed one
        self._prefix_sets: list[set[BlockHash]] = []
        self._recent_routes: list[float] = []
        self._states: dict[str, _WorkerState] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._peak_in_flight = 0
        self._claims: dict[str, _Claim] = {}  # request id -> its pending keys
        self._deadlines: list[tuple[float, str]] = []  # a heap of (deadline, request id)
        self._next_round_robin = 0
        self._next_tie = 0
        self._decisions: Counter[str] = Counter()
        self._routed: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()

    # -- workers ------------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        """Makes a worker routable; it must be registered in the directory. Adding twice is a no-op."""
        if worker_id not in self.directory.workers():
            raise ValueError(f"worker {worker_id!r} is not registered in the directory; register it there first")
        if worker_id in self._states:
            return
        self._states[worker_id] = _WorkerState()
        self._index[worker_id] = len(self._order)
        self._order.append(worker_id)
        self._queue_costs.append(0.0)
        self._pull_costs.append(self.default_pull_cost)
        self._prefix_sets.extend(self.directory.prefix_sets([worker_id]))
        self._recent_routes.append(0.0)

    def remove_worker(self, worker_id: str) -> None:
        """Stops routing to a worker and forgets its in-flight requests and their pending claims."""
        if worker_id not in self._states:
            return
        for request_id in [r for r, f in self._in_flight.items() if f.worker_id == worker_id]:
            self._forget(request_id)
            self._totals["dropped"] += 1
        for request_id in [r for r, c in self._claims.items() if c.worker_id == worker_id]:
            self._end_claim(request_id)
        index = self._index.pop(worker_id)
        del self._order[index], self._queue_costs[index], self._pull_costs[index], self._prefix_sets[index], self._recent_routes[index], self._states[worker_id]
        self._index = {w: i for i, w in enumerate(self._order)}

    def report_load(self, worker_id: str, load: WorkerLoad, received_request_ids: Sequence[str] = ()) -> None:
        """A worker's load, and the routed requests it has received since its last report (their
        prefill is in ``load`` from now on). A late report from a removed worker is ignored."""
        state = self._states.get(worker_id)
        if state is None:
            return
        state.load = load
        for request_id in received_request_ids:
            state.take_unreported(request_id)
        measured = load.pull_cost()
        if measured is not None:
            self._pull_costs[self._index[worker_id]] = measured
        self._refresh(worker_id)

    # -- routing ------------------------------------------------------------------------------

    def route(
        self,
        request_id: str,
        keys: Sequence[BlockHash],
        num_tokens: int,
        *,
        policy: str | None = None,
        worker: str | None = None,
        pull: str | None = None,
        now: float | None = None,
    ) -> RouteDecision:
        """Picks a worker for a request: ``keys`` are its full blocks' keys, from the first, and
        ``num_tokens`` its prompt length. ``worker`` forces one; ``policy`` and ``pull`` override
        the router's. ``now`` (seconds, monotonic) expires pending claims; it defaults to
        ``time.monotonic()``. With ``max_queued_requests`` set, a valid request that would make
        more requests in flight than that raises ``Overloaded`` and records nothing."""
        if request_id in self._in_flight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        now = time.monotonic() if now is None else now
        self.expire_claims(now)
        choice = self.choose(keys, num_tokens, policy=policy, worker=worker, pull=pull)  # a bad request gets its own error
        if self.max_queued_requests is not None and len(self._in_flight) >= self.max_queued_requests:
            self._totals["overloaded"] += 1
            raise Overloaded(self.max_queued_requests, len(self._in_flight))
        policy = self.policy if policy is None else policy
        # The rotations advance per route, so choose() alone never changes a later choice.
        self._next_tie += 1
        self._next_round_robin += policy == "round_robin" and worker is None

        chosen, counts, plan = choice.worker_id, choice.hit, choice.plan
        pulled = len(plan.keys) * self.block_size if plan is not None else 0
        predicted = counts.num_blocks * self.block_size + pulled
        prefill = max(0.0, num_tokens - choice.saved_tokens)
        index = self._index[chosen]
        cost = prefill + self._queue_costs[index]
        if request_id in self._claims:
            self._end_claim(request_id)  # an id reused after it completed
        if keys:
            self.directory.note_prefix(keys[0])
            self._count_share(keys[0], chosen)
        pending_keys = keys[counts.num_blocks :]
        self.directory.mark_pending(chosen, pending_keys, request_id)
        deadline = now + self.pending_ttl_s
        if pending_keys:
            self._claims[request_id] = _Claim(chosen, pending_keys, deadline)
        heapq.heappush(self._deadlines, (deadline, request_id))
        self._in_flight[request_id] = _InFlight(chosen, predicted)
        self._peak_in_flight = max(self._peak_in_flight, len(self._in_flight))
        state = self._states[chosen]
        state.unreported[request_id] = prefill
        state.unreported_tokens += prefill
        self._queue_costs[index] = self.queue_weight * state.queued(self.decode_tokens_per_request)

        oracle = choice.oracle_blocks * self.block_size
        self._decisions[policy] += 1
        self._routed[chosen] += 1
        self._totals["predicted_hit_tokens"] += predicted
        self._totals["oracle_hit_tokens"] += oracle
        self._totals["pull_plans"] += plan is not None
        self._totals["planned_pull_tokens"] += pulled
        self._totals["recomputes_chosen"] += plan is None and choice.lacked_blocks > 0
        self._totals["replications"] += choice.replicates
        by_tier = dict(zip(MATCH_TIERS, map(self.block_size.__mul__, counts)))
        by_tier["remote"] = pulled
        return RouteDecision(request_id, chosen, policy, predicted, by_tier, oracle, cost, plan)

    def choose(
        self, keys: Sequence[BlockHash], num_tokens: int, *, policy: str | None = None, worker: str | None = None, pull: str | None = None
    ) -> RouteChoice:
        """The worker ``route`` would pick for a request, and its hit there, without routing it:
        no pending claim and no bookkeeping (``random`` does draw from the router's generator)."""
        policy = self.policy if policy is None else _check_policy(policy)
        pull = self.pull if pull is None else check_pull(pull)
        if not self._order:
            raise RuntimeError("Router has no workers to route to: add_worker first")
        if worker is not None and worker not in self._states:
            raise ValueError(f"worker {worker!r} is not routable; known workers: {sorted(self._states)}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1 (prompt tokens), got {num_tokens!r}")
        max_blocks = min(len(keys), (num_tokens - 1) // self.block_size)
        held = self.directory.match(keys[:max_blocks]) if max_blocks else {}
        saved: dict[str, float] = {}  # holder -> prefill tokens its cached blocks save
        waits_for: dict[str, float] = {}  # holder -> tokens of its pending hit (queued already)
        oracle_blocks = 0
        source, source_blocks = None, 0  # the routable worker holding the longest pullable run
        device, pending, host, disk = self._saved_per_block
        for counts, holders in held.items():
            saved.update(dict.fromkeys(holders, counts[0] * device + counts[1] * pending + counts[2] * host + counts[3] * disk))
            if counts[1]:
                waits_for.update(dict.fromkeys(holders, counts[1] * self.block_size))
            if counts.num_blocks > oracle_blocks or (not counts[1] and counts.num_blocks > source_blocks):
                routable = next(filter(self._states.__contains__, holders), None)  # C speed, stops at the first
                if routable is not None:
                    oracle_blocks = max(oracle_blocks, counts.num_blocks)
                    if not counts[1] and counts.num_blocks > source_blocks:
                        source, source_blocks = routable, counts.num_blocks

        pulls: dict[str, float] = {}  # worker -> credit with a pull, where that beats its own hit
        replicates = False
        if worker is not None:
            chosen = worker
        elif policy == "prefix":
            credit = saved
            if waits_for:
                credit = saved.copy()
                for worker_id, tokens in waits_for.items():
                    index = self._index.get(worker_id)
                    if index is not None:
                        credit[worker_id] += min(self._queue_costs[index], self.queue_weight * tokens)
            if source is not None and pull == "auto":
                pulls = self._pull_credits(held, saved, source, source_blocks)
                if pulls:
                    credit = {**credit, **pulls}
            chosen = self._cheapest(credit, num_tokens, seeding=not oracle_blocks)
            if self.replicate_hot_prefixes and source is not None and self._wants_replica(keys[0]):
                replica = self._replica(keys[0], credit, chosen, num_tokens, pull, source, source_blocks)
                if replica is not None:
                    chosen, pulled_credit = replica
                    replicates = True
                    if pulled_credit is not None:
                        pulls = {**pulls, chosen: pulled_credit}
        elif policy == "least_loaded":
            chosen = self._cheapest({}, num_tokens, seeding=False)
        elif policy == "round_robin":
            chosen = self._order[self._next_round_robin % len(self._order)]
        else:
            chosen = self._random.choice(self._order)
        hit = _NO_HIT
        if chosen in saved:
            for counts, holders in held.items():
                if chosen in holders:
                    hit = counts
                    break
        lacked = source_blocks - hit.num_blocks if source is not None and source != chosen else 0
        plan = None
        if lacked > 0 and (chosen in pulls or (pull == "always" and not hit.pending)):
            plan = FetchPlan(source, tuple(keys[hit.num_blocks : source_blocks]))
        saved_tokens = pulls[chosen] if chosen in pulls else saved.get(chosen, 0.0)
        if plan is not None and chosen not in pulls:
            saved_tokens += max(0.0, self._pull_saving(chosen, lacked * self.block_size))
        return RouteChoice(chosen, hit, oracle_blocks, saved_tokens, plan, lacked, replicates)

    def _wants_replica(self, first_key: BlockHash) -> bool:
        """Whether the prefix starting with ``first_key`` is hot enough to gain a holder (module doc)."""
        count = self._shares.get(first_key)
        total = self._share_total
        if count is None or count < MIN_REPLICA_REQUESTS * self._share_weight or count * len(self._order) < total:
            return False
        loads = list(compress(self._recent_routes, map(contains, self._prefix_sets, repeat(first_key))))
        return bool(loads) and min(loads) * len(self._order) > REPLICA_MARGIN * total

    def _replica(
        self, first_key: BlockHash, credit: dict[str, float], cheapest: str, num_tokens: int, pull: str, source: str | None, source_blocks: int
    ) -> tuple[str, float | None] | None:
        """The cheapest worker that does not hold a hot prefix, and its credit with a pull (None:
        it computes the prefix); None when each costs more than one full prefill above
        ``cheapest``. Ties go to the worker holding the fewest prefixes."""
        costs = self._queue_costs
        limit = costs[self._index[cheapest]] - credit.get(cheapest, 0.0) + num_tokens
        best = None
        for index, prefixes in enumerate(self._prefix_sets):
            if first_key in prefixes:
                continue
            worker_id = self._order[index]
            own = credit.get(worker_id, 0.0)  # a hit below the device, or the credit of a pull priced already
            pulled = None
            if pull == "auto" and source is not None and worker_id not in credit:  # it holds nothing of the prefix
                saving = self._pull_saving(worker_id, source_blocks * self.block_size)
                if saving > 0:
                    own = pulled = saving
            cost = costs[index] - own
            if cost <= limit and (best is None or (cost, len(prefixes)) < best[0]):
                best = ((cost, len(prefixes)), worker_id, pulled)
        return None if best is None else best[1:]

    def _pull_credits(self, held: dict[BlocksByTier, list[str]], saved: dict[str, float], source: str, source_blocks: int) -> dict[str, float]:
        """Credit (saved prefill tokens) for serving with a pull from ``source``, for the workers
        where it beats their own hit: the least loaded worker and the partial holders (any other
        worker is dearer than the least loaded one, with the same pull)."""
        least_loaded = self._order[self._queue_costs.index(min(self._queue_costs))]
        candidates = {} if least_loaded in saved else {least_loaded: BlocksByTier()}  # a holder is priced below
        for counts, holders in held.items():
            if not counts[1] and counts.num_blocks < source_blocks:
                candidates.update(zip(filter(self._states.__contains__, holders), repeat(counts)))
        credits = {}
        for worker_id, own in candidates.items():  # none is the source, each lacks some blocks
            saving = self._pull_saving(worker_id, (source_blocks - own.num_blocks) * self.block_size)
            if saving > 0:
                credits[worker_id] = saved.get(worker_id, 0.0) + saving
        return credits

    def _pull_saving(self, worker_id: str, tokens: int) -> float:
        """Prefill tokens a worker saves by pulling ``tokens`` instead of computing them: each
        pulled token costs its measured fraction of a computed one, the call a fixed overhead."""
        cost = min(1.0, self._pull_costs[self._index[worker_id]])
        return tokens * (1.0 - cost) - self.pull_overhead_tokens

    def _cheapest(self, saved: dict[str, float], num_tokens: int, seeding: bool) -> str:
        """The worker of least ``queue_weight * queued - saved``; ``saved`` is each holder's credit
        (see the module doc)."""
        costs = self._queue_costs
        if len(saved) * 4 < len(costs):  # a few holders: adjust a copy
            costs = costs.copy()
            for worker_id, tokens in saved.items():
                index = self._index.get(worker_id)
                if index is not None:
                    costs[index] -= tokens
        elif saved:
            costs = list(map(sub, costs, map(saved.get, self._order, repeat(0.0))))
        best = min(costs)
        if not seeding and costs.count(best) == 1:
            return self._order[costs.index(best)]
        limit = best + num_tokens if seeding else best
        candidates = list(compress(range(len(costs)), map(le, costs, repeat(limit))))
        if seeding and len(candidates) > 1:
            held = list(map(len, map(self._prefix_sets.__getitem__, candidates)))
            candidates = list(compress(candidates, map(eq, held, repeat(min(held)))))
        if len(candidates) > 1:  # the fewest recent routes: idle workers take turns
            recent = list(map(self._recent_routes.__getitem__, candidates))
            candidates = list(compress(candidates, map(eq, recent, repeat(min(recent)))))
        return self._order[candidates[self._next_tie % len(candidates)]]

    def complete(self, request_id: str, actual_hit_tokens: int | None, *, now: float | None = None) -> None:
        """Records a finished request's actual hit (tokens served from cache), or a failure
        (``None``), and forgets it; its pending claims end now on a failure, and
        ``completed_claim_s`` after ``now`` (monotonic seconds) on a success. An unknown or
        already forgotten request is ignored."""
        record = self._in_flight.get(request_id)
        if record is None:
            return
        self._forget(request_id)
        claim = self._claims.get(request_id)
        if actual_hit_tokens is None:
            if claim is not None:
                self._end_claim(request_id)
            self._totals["failed"] += 1
            return
        if claim is not None:
            now = time.monotonic() if now is None else now
            if now + self.completed_claim_s < claim.deadline:
                self._claim(request_id, claim._replace(deadline=now + self.completed_claim_s))
        self._totals["completed"] += 1
        self._totals["completed_predicted_hit_tokens"] += record.predicted_hit_tokens
        self._totals["actual_hit_tokens"] += actual_hit_tokens
        self._totals["prediction_error_tokens"] += abs(actual_hit_tokens - record.predicted_hit_tokens)
        self._totals["exact_predictions"] += actual_hit_tokens == record.predicted_hit_tokens

    def stats(self) -> dict:
        """Decisions per policy, predicted vs oracle and vs actual hit tokens, routes per worker."""
        t = self._totals
        larger = max(t["completed_predicted_hit_tokens"], t["actual_hit_tokens"])
        return {
            "decisions": dict(self._decisions),
            "in_flight": len(self._in_flight),
            "peak_in_flight": self._peak_in_flight,
            "max_queued_requests": self.max_queued_requests,
            "overloaded": t["overloaded"],
            "pending_claims": len(self._claims),
            "completed": t["completed"],
            "failed": t["failed"],
            "dropped": t["dropped"],
            "predicted_hit_tokens": t["predicted_hit_tokens"],
            "oracle_hit_tokens": t["oracle_hit_tokens"],
            "hit_vs_oracle": t["predicted_hit_tokens"] / t["oracle_hit_tokens"] if t["oracle_hit_tokens"] else None,
            "completed_predicted_hit_tokens": t["completed_predicted_hit_tokens"],
            "actual_hit_tokens": t["actual_hit_tokens"],
            "prediction_error_tokens": t["prediction_error_tokens"],
            "prediction_accuracy": 1.0 - t["prediction_error_tokens"] / larger if larger else None,
            "exact_predictions": t["exact_predictions"],
            "pull_plans": t["pull_plans"],
            "planned_pull_tokens": t["planned_pull_tokens"],
            "recomputes_chosen": t["recomputes_chosen"],
            "replications": t["replications"],
            "routed_per_worker": dict(self._routed),
        }

    # -- internals ----------------------------------------------------------------------------

    def _count_share(self, first_key: BlockHash, worker_id: str) -> None:
        """Counts a route to ``worker_id`` of the prefix starting with ``first_key`` (see ``_shares``)."""
        weight = self._share_weight * self._share_growth
        if weight > _SHARE_RESCALE_AT:  # every 64 half-lives: back to weight 1, the forgotten dropped
            self._shares = {key: count / weight for key, count in self._shares.items() if count > weight * _SHARE_FORGOTTEN}
            self._share_total /= weight
            self._recent_routes = [count / weight for count in self._recent_routes]
            weight = 1.0
        self._share_weight = weight
        self._shares[first_key] = self._shares.get(first_key, 0.0) + weight
        self._share_total += weight
        self._recent_routes[self._index[worker_id]] += weight

    def _refresh(self, worker_id: str) -> None:
        queued = self._states[worker_id].queued(self.decode_tokens_per_request)
        self._queue_costs[self._index[worker_id]] = self.queue_weight * queued

    def _forget(self, request_id: str) -> None:
        """Drops an in-flight request's queued work; its pending claim is ended apart."""
        record = self._in_flight.pop(request_id)
        self._drop_unreported(record.worker_id, request_id)

    def _drop_unreported(self, worker_id: str, request_id: str) -> None:
        state = self._states.get(worker_id)
        if state is not None and state.take_unreported(request_id):
            self._refresh(worker_id)

    def worker_cleared(self, worker_id: str) -> None:
        """A worker emptied its device pool: the claims its completed requests left are void
        (those of requests still running stay: they compute their blocks again)."""
        for request_id in [r for r, c in self._claims.items() if c.worker_id == worker_id and r not in self._in_flight]:
            self._end_claim(request_id)

    def expire_claims(self, now: float | None = None) -> None:
        """Ends the pending claims whose time is up at ``now`` (monotonic seconds), and stops
        counting the work of requests routed ``pending_ttl_s`` ago that no worker reported."""
        deadlines = self._deadlines
        if not deadlines:
            return
        now = time.monotonic() if now is None else now
        while deadlines and deadlines[0][0] <= now:
            deadline, request_id = heapq.heappop(deadlines)
            claim = self._claims.get(request_id)
            if claim is not None and claim.deadline == deadline:
                self._end_claim(request_id)
            record = self._in_flight.get(request_id)
            if record is not None:
                self._drop_unreported(record.worker_id, request_id)

    def _claim(self, request_id: str, claim: _Claim) -> None:
        """Records (or moves the deadline of) a request's claim; its keys are marked already."""
        self._claims[request_id] = claim
        heapq.heappush(self._deadlines, (claim.deadline, request_id))

    def _end_claim(self, request_id: str) -> None:
        claim = self._claims.pop(request_id)
        self.directory.end_pending(claim.worker_id, claim.keys, request_id)


def check_pull(pull: str) -> str:
    """``pull`` if it is one of ``Router.PULLS``; a ValueError naming it otherwise."""
    if pull not in Router.PULLS:
        raise ValueError(f"pull must be one of {Router.PULLS}, got {pull!r}")
    return pull


def _check_policy(policy: str) -> str:
    if policy not in Router.POLICIES:
        raise ValueError(f"policy must be one of {Router.POLICIES}, got {policy!r}")
    return policy
