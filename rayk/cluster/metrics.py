"""Cache and routing metrics, exported through ``ray.util.metrics`` to Ray's Prometheus endpoint.

Three parts, so that the logic is tested without Ray:

* ``METRICS`` names every metric rayk exports: its kind, unit, labels and meaning. Ray prefixes
  application metrics with ``ray_`` when it exports them (Ray 2.60: ``rayk_cache_hit_tokens_total``
  is scraped as ``ray_rayk_cache_hit_tokens_total``); ``MetricSpec.exported_name`` is the scraped
  name. Every counter's name ends in ``_total``, so Ray adds no suffix of its own.
* ``WorkerMetrics`` and ``CoordinatorMetrics`` are plain classes that turn the stats a worker's
  engine or the coordinator's router already keep into a list of ``Update``s. The stats hold
  cumulative counts; counters get their deltas, so they stay monotonic (a count that went down
  belongs to a new incarnation and counts from zero). Events that are not counts (a finished
  request's TTFT, a transfer's duration) are queued as they happen, O(1) each, and drained with
  the next update.
* ``RayMetricsSink`` applies updates to ``ray.util.metrics`` objects, and ``PeriodicExport`` runs
  collect-and-apply on a thread every ``EXPORT_INTERVAL_S``: measuring reads counters once a
  second, never per token or per step.

Without Ray's metrics agent (plain ``ray`` rather than ``ray[default]``: the agent then runs in
its minimal mode and exports nothing) ``RayMetricsSink.create`` logs one warning per process and
returns None, and nothing is collected.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rayk.cache.events import STORED_TIERS, TIERS
from rayk.outputs import RequestOutput

logger = logging.getLogger(__name__)

RAY_EXPORT_PREFIX = "ray_"
"""What Ray (2.60) puts before an application metric's name in its Prometheus export."""
EXPORT_INTERVAL_S = 1.0
"""How often a worker or the coordinator reads its stats into the metrics (seconds). Ray sends
them on to its agent every ``metrics_report_interval_ms`` (10 s by default)."""

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TRANSFER_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_WORKER = ("namespace", "worker")
_COORDINATOR = ("namespace",)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric. ``kind`` is "counter", "gauge" or "histogram"; ``labels`` are its tag
    keys, in the order the docs list them; ``boundaries`` are a histogram's bucket bounds."""

    name: str
    kind: str
    unit: str
    labels: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        """The name as scraped (a histogram adds ``_bucket``, ``_sum`` and ``_count`` to it)."""
        return RAY_EXPORT_PREFIX + self.name


def _spec(name, kind, unit, labels, description, boundaries=()) -> tuple[str, MetricSpec]:
    return name, MetricSpec(name, kind, unit, labels, description, boundaries)


METRICS: dict[str, MetricSpec] = dict(
    [
        # -- per worker: the cache -------------------------------------------------------------
        _spec("rayk_cache_query_tokens_total", "counter", "tokens", _WORKER, "Prompt tokens looked up in the prefix cache."),
        _spec(
            "rayk_cache_hit_tokens_total",
            "counter",
            "tokens",
            (*_WORKER, "tier"),
            "Prompt tokens served from the cache, by the tier they were found in (device, host, disk, remote = pulled from a peer).",
        ),
        _spec("rayk_cache_miss_tokens_total", "counter", "tokens", _WORKER, "Prompt tokens no tier held: computed (query - hits)."),
        _spec(
            "rayk_cache_blocks",
            "gauge",
            "blocks",
            (*_WORKER, "tier", "state"),
            "Blocks per tier and state: used (referenced by a request) and free partition the device pool; "
            "cached (holding a key, used or free) overlaps both. The host and disk tiers report cached.",
        ),
        _spec("rayk_cache_capacity_blocks", "gauge", "blocks", (*_WORKER, "tier"), "Blocks a tier can hold (device, host)."),
        _spec("rayk_cache_evictions_total", "counter", "blocks", (*_WORKER, "tier"), "Cached blocks evicted from a tier to make room."),
        # -- per worker: transfers ---------------------------------------------------------------
        _spec(
            "rayk_transfer_bytes_total",
            "counter",
            "bytes",
            (*_WORKER, "kind", "source", "target"),
            "KV bytes moved: tier copies (demote, onload, offload, prefetch), batches served to peers (export) "
            "and batches pulled from peers (pull, source=peer, target=remote).",
        ),
        _spec(
            "rayk_transfer_seconds",
            "histogram",
            "seconds",
            (*_WORKER, "kind"),
            "Duration of one batched transfer; a pull is timed from the call to the source to the checked batch.",
            _TRANSFER_BUCKETS_S,
        ),
        _spec("rayk_transfer_failed_pulls_total", "counter", "pulls", (*_WORKER, "reason"), "Pulls that brought fewer blocks than planned, by reason."),
        # -- per worker: requests ----------------------------------------------------------------
        _spec("rayk_queue_requests", "gauge", "requests", (*_WORKER, "state"), "Requests in the worker's scheduler: waiting or running."),
        _spec("rayk_requests_total", "counter", "requests", (*_WORKER, "finish_reason"), "Requests finished by the worker (stop or length)."),
        _spec("rayk_generated_tokens_total", "counter", "tokens", _WORKER, "Tokens generated."),
        _spec("rayk_request_ttft_seconds", "histogram", "seconds", _WORKER, "Time from a request's arrival at its worker to its first token.", _LATENCY_BUCKETS_S),
        _spec("rayk_request_latency_seconds", "histogram", "seconds", _WORKER, "Time from a request's arrival at its worker to its last token.", _LATENCY_BUCKETS_S),
        # -- the coordinator ---------------------------------------------------------------------
        _spec("rayk_routing_decisions_total", "counter", "requests", (*_COORDINATOR, "policy"), "Requests routed, by routing policy."),
        _spec("rayk_routing_routed_requests_total", "counter", "requests", (*_COORDINATOR, "worker"), "Requests routed, by the worker chosen."),
        _spec("rayk_routing_outcomes_total", "counter", "requests", (*_COORDINATOR, "outcome"), "Routed requests that completed, failed or were dropped."),
        _spec("rayk_routing_predicted_hit_tokens_total", "counter", "tokens", _COORDINATOR, "Hit tokens the router predicted, over every routed request."),
        _spec(
            "rayk_routing_oracle_hit_tokens_total",
            "counter",
            "tokens",
            _COORDINATOR,
            "The largest hit any routable worker could have given, over every routed request.",
        ),
        _spec(
            "rayk_routing_completed_predicted_hit_tokens_total",
            "counter",
            "tokens",
            _COORDINATOR,
            "Predicted hit tokens of the completed requests (compare with rayk_routing_actual_hit_tokens_total).",
        ),
        _spec("rayk_routing_actual_hit_tokens_total", "counter", "tokens", _COORDINATOR, "Hit tokens the completed requests actually had, as their drivers reported."),
        _spec("rayk_routing_pull_plans_total", "counter", "requests", _COORDINATOR, "Routes that came with a plan to pull blocks from a peer."),
        _spec("rayk_routing_planned_pull_tokens_total", "counter", "tokens", _COORDINATOR, "Tokens the pull plans named."),
        _spec("rayk_routing_in_flight", "gauge", "requests", _COORDINATOR, "Requests routed and not yet completed."),
        _spec("rayk_directory_blocks", "gauge", "blocks", _COORDINATOR, "Distinct block keys in the prefix directory."),
        _spec("rayk_cluster_workers", "gauge", "workers", _COORDINATOR, "Live workers the coordinator routes to."),
    ]
)


@dataclass(frozen=True)
class Update:
    """One change to a metric: a counter's increment, a gauge's value, a histogram's observation."""

    name: str
    value: float
    tags: Mapping[str, str]


class _Deltas:
    """Turns cumulative counts into increments, per metric and tag set."""

    def __init__(self):
        self._last: dict[tuple, float] = {}

    def delta(self, name: str, tags: Mapping[str, str], total: float) -> float:
        key = (name, *sorted(tags.items()))
        last = self._last.get(key, 0.0)
        self._last[key] = total
        return total - last if total >= last else total  # a smaller total restarted from zero


class _Updates(list):
    """The updates of one collection; counters go through ``deltas`` and skip zero increments."""

    def __init__(self, deltas: _Deltas, base: Mapping[str, str]):
        super().__init__()
        self.deltas = deltas
        self.base = base

    def count(self, name: str, total: float, **tags: str) -> None:
        tags = {**self.base, **tags}
        increment = self.deltas.delta(name, tags, total)
        if increment:
            self.append(Update(name, increment, tags))

    def add(self, name: str, value: float, **tags: str) -> None:
        """A gauge's value, a histogram's observation, or a counter's increment as given."""
        self.append(Update(name, value, {**self.base, **tags}))


class WorkerMetrics:
    """One worker's metrics. ``request_finished``, ``transfer_done`` and ``pull_done`` may be
    called from any thread (a deque's append and popleft are atomic); ``updates`` from one."""

    def __init__(self, worker_id: str, namespace: str):
        self.tags = {"namespace": namespace, "worker": worker_id}
        self._deltas = _Deltas()
        self._events: collections.deque[tuple] = collections.deque()

    def request_finished(self, output: RequestOutput) -> None:
        self._events.append(("request", output.finish_reason, output.ttft_s, output.latency_s))

    def transfer_done(self, kind: str, source: str, target: str, num_blocks: int, num_bytes: int, start_s: float, end_s: float) -> None:
        """A ``TierChain`` transfer observer: one batched copy between tiers, or an export."""
        self._events.append(("transfer", kind, source, target, num_bytes, end_s - start_s))

    def pull_done(self, seconds: float) -> None:
        """One pull from a peer, whatever it brought (its bytes come from the puller's stats)."""
        self._events.append(("transfer", "pull", None, None, 0, seconds))

    def updates(self, engine_stats: dict, transfer_stats: dict) -> list[Update]:
        """What changed since the last call. ``engine_stats`` is ``LLMEngine.stats()``,
        ``transfer_stats`` is ``PeerPuller.stats()``."""
        out = _Updates(self._deltas, self.tags)
        prefix = engine_stats["prefix_cache"]
        out.count("rayk_cache_query_tokens_total", prefix["query_tokens"])
        out.count("rayk_cache_miss_tokens_total", prefix["miss_tokens"])
        for tier in TIERS:
            out.count("rayk_cache_hit_tokens_total", prefix["hit_tokens_by_tier"].get(tier, 0), tier=tier)
        for tier, stats in zip(STORED_TIERS, (engine_stats["device_pool"], engine_stats["host_tier"], engine_stats["disk_tier"])):
            if stats is None:
                continue
            for state in ("used", "free", "cached"):
                if f"{state}_blocks" in stats:
                    out.add("rayk_cache_blocks", stats[f"{state}_blocks"], tier=tier, state=state)
            if "num_blocks" in stats:
                out.add("rayk_cache_capacity_blocks", stats["num_blocks"], tier=tier)
            out.count("rayk_cache_evictions_total", stats["evictions"], tier=tier)
        scheduler = engine_stats["scheduler"]
        for state in ("waiting", "running"):
            out.add("rayk_queue_requests", scheduler[state], state=state)
        out.count("rayk_generated_tokens_total", engine_stats["requests"]["generated_tokens"])
        out.count("rayk_transfer_bytes_total", transfer_stats["pulled_bytes"], kind="pull", source="peer", target="remote")
        for reason, total in transfer_stats["failed_pulls"].items():
            out.count("rayk_transfer_failed_pulls_total", total, reason=reason)
        self._drain(out)
        return out

    def _drain(self, out: _Updates) -> None:
        for _ in range(len(self._events)):
            event = self._events.popleft()
            if event[0] == "request":
                _, finish_reason, ttft_s, latency_s = event
                out.add("rayk_requests_total", 1, finish_reason=str(finish_reason))
                if ttft_s is not None:
                    out.add("rayk_request_ttft_seconds", ttft_s)
                if latency_s is not None:
                    out.add("rayk_request_latency_seconds", latency_s)
            else:
                _, kind, source, target, num_bytes, seconds = event
                if num_bytes:
                    out.add("rayk_transfer_bytes_total", num_bytes, kind=kind, source=source, target=target)
                out.add("rayk_transfer_seconds", seconds, kind=kind)


class CoordinatorMetrics:
    """The coordinator's metrics, from its router's and directory's counts."""

    def __init__(self, namespace: str):
        self.tags = {"namespace": namespace}
        self._deltas = _Deltas()

    def updates(self, routing_stats: dict, directory_blocks: int, num_workers: int) -> list[Update]:
        """What changed since the last call; ``routing_stats`` is ``Router.stats()``."""
        out = _Updates(self._deltas, self.tags)
        for policy, total in routing_stats["decisions"].items():
            out.count("rayk_routing_decisions_total", total, policy=policy)
        for worker, total in routing_stats["routed_per_worker"].items():
            out.count("rayk_routing_routed_requests_total", total, worker=worker)
        for outcome in ("completed", "failed", "dropped"):
            out.count("rayk_routing_outcomes_total", routing_stats[outcome], outcome=outcome)
        for stat in ("predicted_hit_tokens", "oracle_hit_tokens", "completed_predicted_hit_tokens", "actual_hit_tokens", "pull_plans", "planned_pull_tokens"):
            out.count(f"rayk_routing_{stat}_total", routing_stats[stat])
        out.add("rayk_routing_in_flight", routing_stats["in_flight"])
        out.add("rayk_directory_blocks", directory_blocks)
        out.add("rayk_cluster_workers", num_workers)
        return out


def missing_metrics_agent() -> ImportError | None:
    """Why Ray's metrics agent cannot export (the packages ``ray[default]`` adds are missing),
    or None. Ray itself decides on the same import whether its agent runs in minimal mode."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as error:
        return error
    return None


_warned_no_agent = False


class RayMetricsSink:
    """Applies updates to ``ray.util.metrics`` objects, one per metric in ``METRICS``."""

    def __init__(self):
        from ray.util import metrics

        kinds = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}
        self._metrics = {}
        for spec in METRICS.values():
            options = {"boundaries": list(spec.boundaries)} if spec.kind == "histogram" else {}
            self._metrics[spec.name] = kinds[spec.kind](spec.name, description=f"{spec.description} ({spec.unit})", tag_keys=spec.labels, **options)
        self._apply = {"counter": "inc", "gauge": "set", "histogram": "observe"}

    @classmethod
    def create(cls) -> RayMetricsSink | None:
        """A sink, or None (after one warning per process) when Ray's metrics agent is absent."""
        global _warned_no_agent
        error = missing_metrics_agent()
        if error is None:
            return cls()
        if not _warned_no_agent:
            _warned_no_agent = True
            logger.warning("rayk exports no metrics: Ray's metrics agent needs ray[default] (%s)", error)
        return None

    def apply(self, updates: Sequence[Update]) -> None:
        for update in updates:
            metric = self._metrics[update.name]
            getattr(metric, self._apply[METRICS[update.name].kind])(update.value, tags=dict(update.tags))


class PeriodicExport:
    """Every ``interval_s``, on its own thread, applies ``collect()``'s updates to ``sink``. A
    failure is logged once and tried again next time; updates collected but not applied (their
    counter increments are already taken from the totals) go with the next attempt."""

    def __init__(self, collect: Callable[[], list[Update]], sink: RayMetricsSink, interval_s: float = EXPORT_INTERVAL_S):
        self.collect = collect
        self.sink = sink
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayk-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        warned = False
        pending: list[Update] = []
        while not self._stop.wait(self.interval_s):
            try:
                pending.extend(self.collect())
                self.sink.apply(pending)
                pending = []
            except Exception:
                if not warned:
                    logger.warning("collecting metrics failed; trying again every %s s", self.interval_s, exc_info=True)
                    warned = True
