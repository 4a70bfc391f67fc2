"""Metrics: the plain classes turn a real engine's and router's counts into monotonic updates;
end to end, a two-worker cluster's counts reach Ray's Prometheus endpoint under the documented
names; the Grafana dashboard and the docs name only metrics rayk exports."""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import re
import socket
import time
import urllib.request

import pytest

import rayk
from rayk.cluster.coordinator import CoordinatorState
from rayk.cluster.metrics import METRICS, CoordinatorMetrics, PeriodicExport, Update, WorkerMetrics
from rayk.cluster.routing import FetchPlan, WorkerLoad
from rayk.cluster.transfer import PeerPuller
from tests.conftest import BLOCK_SIZE, random_prompts

ROOT = pathlib.Path(__file__).resolve().parent.parent
GREEDY = rayk.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
EXPORTED = {spec.exported_name: spec for spec in METRICS.values()}


def test_updates_a_failed_export_took_go_with_the_next_one():
    class FlakySink:
        def __init__(self):
            self.calls, self.applied = 0, []

        def apply(self, updates):
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("metrics agent restarting")
            self.applied.extend(updates)

    sink, batches = FlakySink(), iter(range(1, 1000))
    export = PeriodicExport(lambda: [Update("rayk_requests_total", next(batches), {})], sink, interval_s=0.01)
    deadline = time.monotonic() + 30
    while sink.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    export.close()
    values = [u.value for u in sink.applied]
    assert values[:3] == [1, 2, 3]  # the first batch failed, then came with the second


def _totals(updates, name: str, by: str | None = None):
    """The sum of a metric's update values, or per value of the label ``by``."""
    if by is None:
        return sum(u.value for u in updates if u.name == name)
    totals = collections.Counter()
    for u in updates:
        if u.name == name:
            totals[u.tags[by]] += u.value
    return dict(totals)


def _puller_stats(engine) -> dict:
    return PeerPuller(None, engine.kv_cache_manager.hasher, engine.kv_cache.layout).stats()


@pytest.fixture()
def llm(tiny_llama_dir):
    llm = rayk.LLM(str(tiny_llama_dir), device="cpu", block_size=BLOCK_SIZE, num_device_blocks=12, host_blocks=32)
    yield llm
    llm.close()


# -- the plain classes ------------------------------------------------------------------------


def test_hit_and_miss_tokens_are_the_engines_counts_and_a_second_read_adds_nothing(llm):
    metrics = WorkerMetrics("worker-0", "ns")
    prompt = random_prompts([50], seed=1)[0]
    llm.generate([prompt, prompt], GREEDY)
    stats = llm.engine.stats()
    updates = metrics.updates(stats, _puller_stats(llm.engine))
    prefix = stats["prefix_cache"]
    assert prefix["hit_tokens"] == 48  # the repeat hit the prompt's 3 full blocks
    assert _totals(updates, "rayk_cache_hit_tokens_total", by="tier") == {t: n for t, n in prefix["hit_tokens_by_tier"].items() if n}
    assert _totals(updates, "rayk_cache_miss_tokens_total") == prefix["query_tokens"] - 48
    assert _totals(updates, "rayk_cache_query_tokens_total") == prefix["query_tokens"]
    assert all(u.tags["worker"] == "worker-0" and u.tags["namespace"] == "ns" for u in updates)

    again = metrics.updates(llm.engine.stats(), _puller_stats(llm.engine))
    assert not [u for u in again if METRICS[u.name].kind == "counter"]  # nothing happened: no increment
    assert _totals(again, "rayk_cache_blocks") > 0  # gauges are set every time


def test_counters_take_deltas_and_a_new_incarnation_counts_from_zero(llm, tiny_llama_dir):
    metrics = WorkerMetrics("worker-0", "ns")
    prompts = random_prompts([40, 40], seed=2)
    llm.generate(prompts[0], GREEDY)
    first = metrics.updates(llm.engine.stats(), _puller_stats(llm.engine))
    llm.generate(prompts[1], GREEDY)
    second = metrics.updates(llm.engine.stats(), _puller_stats(llm.engine))
    assert _totals(first, "rayk_cache_query_tokens_total") == 40
    assert _totals(second, "rayk_cache_query_tokens_total") == 40
    assert _totals(second, "rayk_generated_tokens_total") == GREEDY.max_tokens

    restarted = rayk.LLM(str(tiny_llama_dir), device="cpu", block_size=BLOCK_SIZE, num_device_blocks=12)
    try:
        restarted.generate(random_prompts([20], seed=3)[0], GREEDY)
        after = metrics.updates(restarted.engine.stats(), _puller_stats(restarted.engine))
    finally:
        restarted.close()
    assert _totals(after, "rayk_cache_query_tokens_total") == 20  # its total, not 20 - 80
    assert all(u.value > 0 for u in first + second + after if METRICS[u.name].kind == "counter")


def test_blocks_evictions_and_tier_copies_follow_the_device_pool_and_host_tier(llm):
    metrics = WorkerMetrics("worker-0", "ns")
    llm.engine.cache.chain.transfer_observers.append(metrics.transfer_done)
    for prompt in random_prompts([60] * 4, seed=4):  # 4 blocks each on a 12-block pool
        llm.generate(prompt, GREEDY)
    stats = llm.engine.stats()
    updates = metrics.updates(stats, _puller_stats(llm.engine))
    device = stats["device_pool"]
    blocks = {(u.tags["tier"], u.tags["state"]): u.value for u in updates if u.name == "rayk_cache_blocks"}
    assert blocks[("device", "used")] + blocks[("device", "free")] == device["num_blocks"] == 12
    assert blocks[("device", "cached")] == device["cached_blocks"] > 0
    assert blocks[("host", "cached")] == stats["host_tier"]["cached_blocks"] > 0
    assert device["evictions"] > 0  # the fourth prompt evicted the first's blocks, demoted to the host
    assert _totals(updates, "rayk_cache_evictions_total", by="tier") == {"device": device["evictions"]}
    demoted = [u for u in updates if u.name == "rayk_transfer_bytes_total" and u.tags["kind"] == "demote"]
    bytes_per_block = device["bytes_per_block"]
    assert sum(u.value for u in demoted) == stats["host_tier"]["stored_blocks"] * bytes_per_block
    assert {(u.tags["source"], u.tags["target"]) for u in demoted} == {("device", "host")}
    copies = [u for u in updates if u.name == "rayk_transfer_seconds"]
    assert len(copies) >= len(demoted) and all(u.value >= 0 for u in copies)


def test_finished_requests_give_one_ttft_and_one_latency_each(llm):
    metrics = WorkerMetrics("worker-0", "ns")
    outputs = llm.generate(random_prompts([20, 30, 40], seed=5), GREEDY)
    for output in outputs:
        metrics.request_finished(output)
    updates = metrics.updates(llm.engine.stats(), _puller_stats(llm.engine))
    assert _totals(updates, "rayk_requests_total", by="finish_reason") == {"length": 3}
    assert sorted(u.value for u in updates if u.name == "rayk_request_ttft_seconds") == sorted(o.ttft_s for o in outputs)
    assert sorted(u.value for u in updates if u.name == "rayk_request_latency_seconds") == sorted(o.latency_s for o in outputs)
    assert not [u for u in metrics.updates(llm.engine.stats(), _puller_stats(llm.engine)) if u.name.startswith("rayk_request")]


def test_a_failed_pull_is_timed_and_counted_by_reason(llm):
    metrics = WorkerMetrics("worker-0", "ns")

    async def unreachable(source, keys):
        raise ConnectionError(f"{source} is gone")

    puller = PeerPuller(unreachable, llm.engine.kv_cache_manager.hasher, llm.engine.kv_cache.layout)
    start = time.perf_counter()
    assert asyncio.run(puller.pull(FetchPlan("worker-1", (bytes(16),)))) is None
    metrics.pull_done(time.perf_counter() - start)
    updates = metrics.updates(llm.engine.stats(), puller.stats())
    assert _totals(updates, "rayk_transfer_failed_pulls_total", by="reason") == {"ConnectionError": 1}
    assert [u.tags["kind"] for u in updates if u.name == "rayk_transfer_seconds"] == ["pull"]
    assert not [u for u in updates if u.name == "rayk_transfer_bytes_total"]  # nothing arrived


def test_coordinator_metrics_count_decisions_per_policy_and_predicted_against_actual_hits():
    state = CoordinatorState(block_size=16)
    for worker_id in ("worker-0", "worker-1"):
        state.report(worker_id, 1, [], WorkerLoad(), [], now=0.0)
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    state.route("a", keys, 50)
    state.route("b", keys, 50, policy="round_robin")
    state.route("c", keys, 50)
    state.complete([("a", 0), ("b", 32), ("c", None)])
    metrics = CoordinatorMetrics("ns")
    routing = state.router.stats()
    updates = metrics.updates(routing, state.directory.num_blocks, len(state.workers()))
    assert _totals(updates, "rayk_routing_decisions_total", by="policy") == {"prefix": 2, "round_robin": 1}
    assert _totals(updates, "rayk_routing_outcomes_total", by="outcome") == {"completed": 2, "failed": 1}
    assert _totals(updates, "rayk_routing_actual_hit_tokens_total") == 32
    assert _totals(updates, "rayk_routing_completed_predicted_hit_tokens_total") == routing["completed_predicted_hit_tokens"]
    assert _totals(updates, "rayk_routing_predicted_hit_tokens_total") == routing["predicted_hit_tokens"]
    assert sum(_totals(updates, "rayk_routing_routed_requests_total", by="worker").values()) == 3
    assert _totals(updates, "rayk_cluster_workers") == 2
    assert _totals(updates, "rayk_routing_in_flight") == 0

    state.route("d", keys, 50)
    later = metrics.updates(state.router.stats(), state.directory.num_blocks, 2)
    assert _totals(later, "rayk_routing_decisions_total", by="policy") == {"prefix": 1}


# -- names, docs and the dashboard ------------------------------------------------------------


def test_every_metric_is_named_and_labelled_the_prometheus_way():
    for name, spec in METRICS.items():
        assert re.fullmatch(r"rayk_[a-z_]+", name) and spec.exported_name == "ray_" + name, name
        assert spec.kind in ("counter", "gauge", "histogram")
        assert name.endswith("_total") == (spec.kind == "counter"), name  # so Ray adds no _total of its own
        assert spec.kind != "histogram" or (name.endswith("_seconds") and list(spec.boundaries) == sorted(spec.boundaries))
        assert all(re.fullmatch(r"[a-z_]+", label) for label in spec.labels), name


def _metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (histogram series mapped to their metric)."""
    names = set()
    for name in re.findall(r"\b(ray_rayk_[a-z_]+)\b", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in EXPORTED and EXPORTED[base].kind == "histogram" else name)
    return names


def test_the_dashboard_queries_only_metrics_rayk_exports_with_their_labels():
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in variables.values() if v["type"] == "query"]
    assert len(queries) >= 20
    used = set()
    for expr in queries:
        names = _metric_names_in(expr)
        assert names, f"a query names no rayk metric: {expr}"
        assert names <= set(EXPORTED), f"not exported by rayk: {names - set(EXPORTED)} in {expr}"
        labels = set().union(*(EXPORTED[n].labels for n in names)) | {"le"}
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        selected = set(re.findall(r"([a-z_]+)=~?\"", expr))
        assert grouped | selected <= labels, f"labels {(grouped | selected) - labels} not on {names}"
        used |= names
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    histogram_panels = {n for n in used if EXPORTED[n].kind == "histogram"}
    assert histogram_panels == {n for n, s in EXPORTED.items() if s.kind == "histogram"}


def test_the_docs_describe_every_metric_under_its_scraped_name():
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for name, spec in EXPORTED.items():
        assert f"`{name}`" in docs, name


# -- end to end -------------------------------------------------------------------------------

NAMESPACE = "rayk-test-metrics"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """Every rayk sample the node's metrics endpoint serves: name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = collections.defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_rayk_"):
                samples[sample.name].append((sample.labels, sample.value))
    return samples


def _sum(samples, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, ()) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def metrics_port():
    import ray

    port = _free_port()
    ray.init(
        address="local",  # a Ray of its own, even while other Rays run on this machine
        num_cpus=2,
        namespace=NAMESPACE,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,  # the per-node agent that serves metrics runs all the same
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 200},
    )
    try:
        yield port
    finally:
        ray.shutdown()


def test_a_clusters_counts_reach_rays_prometheus_endpoint(metrics_port, tiny_llama_dir):
    prefix = random_prompts([48], seed=6)[0]
    questions = random_prompts([3, 4, 5, 6, 7, 8], seed=7)
    with rayk.Cluster(str(tiny_llama_dir), num_workers=2, device="cpu", namespace=NAMESPACE, block_size=BLOCK_SIZE) as cluster:
        outputs = [cluster.generate(prefix + q, GREEDY)[0] for q in questions[:4]]
        outputs += [cluster.generate(prefix + q, GREEDY, routing="round_robin")[0] for q in questions[4:]]
        stats = cluster.stats()
        hits = sum(o.num_cached_tokens for o in outputs)
        assert hits >= 3 * 48  # the repeats after the first hit the shared prefix
        expected = {
            "requests": len(outputs),
            "hits": stats["cluster"]["prefix_cache"]["hit_tokens"],
            "queries": stats["cluster"]["prefix_cache"]["query_tokens"],
            "decisions": len(outputs),
            "actual_hits": hits,
        }
        deadline = time.monotonic() + 60  # a worker exports once a second, Ray every 0.2 s here
        while True:
            samples = _scrape(metrics_port)
            seen = {
                "requests": _sum(samples, "ray_rayk_requests_total", namespace=NAMESPACE),
                "hits": _sum(samples, "ray_rayk_cache_hit_tokens_total", namespace=NAMESPACE),
                "queries": _sum(samples, "ray_rayk_cache_query_tokens_total", namespace=NAMESPACE),
                "decisions": _sum(samples, "ray_rayk_routing_decisions_total", namespace=NAMESPACE),
                "actual_hits": _sum(samples, "ray_rayk_routing_actual_hit_tokens_total", namespace=NAMESPACE),
            }
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert seen == expected
    assert hits == expected["hits"]  # every hit the workers counted went to a request's output
    assert _sum(samples, "ray_rayk_cache_hit_tokens_total", tier="device") == stats["cluster"]["prefix_cache"]["hit_tokens_by_tier"]["device"]
    assert _sum(samples, "ray_rayk_request_ttft_seconds_count") == len(outputs)
    assert _sum(samples, "ray_rayk_request_latency_seconds_count") == len(outputs)
    # Ray 2.60 records each observation at its bucket's midpoint (so _sum is approximate), but the
    # buckets are exact: each holds the requests whose TTFT is within its bound.
    for le in METRICS["rayk_request_ttft_seconds"].boundaries:
        within = sum(o.ttft_s <= le for o in outputs)
        assert sum(v for lab, v in samples["ray_rayk_request_ttft_seconds_bucket"] if float(lab["le"]) == le) == within, le
    assert _sum(samples, "ray_rayk_routing_decisions_total", namespace=NAMESPACE, policy="prefix") == 4
    assert _sum(samples, "ray_rayk_routing_decisions_total", namespace=NAMESPACE, policy="round_robin") == 2
    assert {lab["worker"] for lab, _ in samples["ray_rayk_queue_requests"]} == {"worker-0", "worker-1"}
    device = {lab["state"]: v for lab, v in samples["ray_rayk_cache_blocks"] if lab["worker"] == "worker-0" and lab["tier"] == "device"}
    assert device["used"] + device["free"] == stats["workers"]["worker-0"]["device_pool"]["num_blocks"]
    assert _sum(samples, "ray_rayk_cluster_workers") == 2
    assert set(samples) - {n + s for n in EXPORTED for s in ("", "_bucket", "_sum", "_count")} == set()
