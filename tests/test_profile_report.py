"""The HTML memory report: axes with ticks, legends, the heatmap's colour scale, a table row per
worker and tier, escaping, and the report for one engine and for a real two-worker cluster
recorded while traffic runs."""

from __future__ import annotations

import re
import threading
import time
from html.parser import HTMLParser

import pytest

import rayk
from rayk.profile_report import nice_ticks, render_report
from tests.conftest import BLOCK_SIZE, local_ray_nodes, random_prompts

GREEDY = rayk.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
NAMESPACE = "rayk-test-profile-report"
HOSTILE = "<script>alert('x')</script>&\""


class _Page(HTMLParser):
    """The page's SVGs (their class and every <text> as (class, text)) and table rows (cells)."""

    def __init__(self, page: str):
        super().__init__()
        self.svgs: list[dict] = []
        self.tables: list[list[list[str]]] = []
        self.tags: set[str] = set()
        self._text_class: str | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "svg":
            self.svgs.append({"class": attrs.get("class"), "texts": []})
        elif tag == "text":
            self._text_class = attrs.get("class", "")
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "text":
            self._text_class = None
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._text_class is not None:
            self.svgs[-1]["texts"].append((self._text_class, data))
        if self._cell is not None:
            self._cell.append(data)

    def texts(self, svg: dict, css: str) -> list[str]:
        return [text for cls, text in svg["texts"] if cls == css]


def _memory_profile(device_hits: int, host_hits: int, query: int) -> dict:
    """A memory profile shaped as ``LLMEngine.memory_profile`` makes one (device, host, disk)."""

    def pool(total, free, cached, hits, **extra):
        return {
            "total_bytes": total * 1024,
            "used_bytes": (total - free) * 1024,
            "free_bytes": free * 1024,
            "reserved_bytes": 0,
            "bytes_per_block": 1024,
            "physical_blocks": {"total": total, "referenced": total - free, "free": free, "cached": cached, "pinned": 0, "reserved": 0},
            "external_fragmentation": {"free_runs": 2, "largest_free_run": free - 1, "run_length_histogram": {1: 1, free - 1: 1}, "index": 1 / free},
            "allocator_overhead_bytes": 100,
            "evictions": 7,
            "hit_tokens": hits,
            "hit_rate": hits / query,
        } | extra

    return {
        "device": pool(64, 20, 40, device_hits, internal_fragmentation={"unused_slots": 12, "fraction": 0.25}),
        "host": pool(32, 10, 22, host_hits),
        "disk": {"total_bytes": 2**20, "used_bytes": 5 * 1024, "free_bytes": 2**20 - 5 * 1024, "cached_blocks": 5, "rejected": 0, "hit_tokens": 0, "hit_rate": 0.0},
        "prefix_cache": {"query_tokens": query, "hit_tokens": device_hits + host_hits},
    }


def _recording(transfer_kind: str = "demote") -> dict:
    """200 steps over 2 s; device occupancy peaks at 37 blocks; step i reads 10 of 64 blocks."""
    steps = [
        {
            "start": 0.01 * i,
            "end": 0.01 * (i + 1),
            "requests": 2,
            "tokens": 3,
            "occupancy": {"device": min(37, i), "device_used": min(20, i), "host": i // 10, "disk": i // 50},
            "hit_rate": 0.6 * i / 199,
        }
        for i in range(200)
    ]
    return {
        "steps": steps,
        "transfers": [
            {"kind": transfer_kind, "source": "device", "target": "host", "blocks": 4, "bytes": 4096, "start": 0.5, "end": 0.501},
            {"kind": "onload", "source": "host", "target": "device", "blocks": 2, "bytes": 2048, "start": 1.0, "end": 1.002},
        ],
        "evictions": [{"tier": "device", "blocks": 4, "time": 0.5}, {"tier": "host", "blocks": 1, "time": 1.5}],
        "accesses": [list(range(i % 50, i % 50 + 10)) for i in range(200)],
        "num_device_blocks": 64,
        "seconds": 2.0,
    }


def test_ticks_are_spaced_1_2_or_5_and_cover_the_top():
    assert nice_ticks(2.0) == [0, 0.5, 1, 1.5, 2]
    assert nice_ticks(37) == [0, 10, 20, 30, 40]
    assert nice_ticks(100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.026) == [0, 0.01, 0.02, 0.03]
    assert nice_ticks(0) == [0, 1]


def test_line_charts_have_ticks_with_values_and_units_and_a_legend():
    page = _Page(render_report("profile", {"worker-0": {"memory_profile": _memory_profile(300, 60, 900), "recording": _recording()}}))
    occupancy, hit_rate = [s for s in page.svgs if s["class"] == "chart"]
    for chart in (occupancy, hit_rate):
        assert page.texts(chart, "tick x") == ["0 s", "0.5 s", "1 s", "1.5 s", "2 s"]
        assert page.texts(chart, "axis-title")[0] == "time since the recording started (s)"
    assert page.texts(occupancy, "tick y") == ["0", "10", "20", "30", "40"]
    assert page.texts(occupancy, "legend") == ["device cached", "device in use", "host cached", "disk cached"]
    assert page.texts(occupancy, "axis-title")[1] == "blocks"
    assert page.texts(hit_rate, "tick y") == ["0%", "20%", "40%", "60%", "80%", "100%"]
    assert page.texts(hit_rate, "legend") == ["cumulative hit rate"]


def test_the_heatmap_has_step_and_block_ticks_and_a_colour_scale():
    page_text = render_report("profile", {"worker-0": {"memory_profile": _memory_profile(300, 60, 900), "recording": _recording()}})
    page = _Page(page_text)
    [heatmap] = [s for s in page.svgs if s["class"] == "heatmap"]
    assert page.texts(heatmap, "tick x") == ["0", "50", "100", "150", "200"]  # steps
    assert page.texts(heatmap, "tick y") == ["0", "20", "40", "60"]  # block ids, axis ends at 64
    # 200 steps in 160 columns: a column holds one or two steps, so a cell counts 1 or 2 reads.
    assert page.texts(heatmap, "tick scale") == ["0", "1", "2"]
    assert page.texts(heatmap, "scale-title") == ["reads per cell"]
    assert "each cell spans 1.25 step(s) × 1 block(s)" in page_text


def test_the_summary_table_has_a_row_per_worker_and_tier_and_their_totals():
    profiles = {
        "worker-0": {"memory_profile": _memory_profile(300, 60, 900), "recording": _recording()},
        "worker-1": {"memory_profile": _memory_profile(16, 0, 100), "recording": None},
    }
    page = _Page(render_report("cluster", profiles))
    header, *rows = page.tables[0]
    assert header[:2] == ["worker", "tier"] and {"blocks", "used", "cached", "free", "hit tokens", "hit rate", "evictions"} <= set(header)
    column = {name: i for i, name in enumerate(header)}
    by_row = {(r[0], r[1]): r for r in rows}
    assert list(by_row) == [(w, t) for w in ("worker-0", "worker-1") for t in ("device", "host", "disk", "all tiers")]
    device = by_row["worker-0", "device"]
    assert [device[column[c]] for c in ("blocks", "used", "cached", "free")] == ["64", "44", "40", "20"]
    assert device[column["bytes used / total"]] == "44 KiB / 64 KiB"
    assert device[column["hit tokens"]] == "300" and device[column["hit rate"]] == "33.3%"
    assert device[column["internal frag."]] == "25.0%" and device[column["external frag."]] == "0.05"
    assert device[column["evictions"]] == "7" and device[column["evicted (rec.)"]] == "4"
    assert device[column["moved in (rec.)"]] == "2 blocks, 2 KiB" and device[column["moved out (rec.)"]] == "4 blocks, 4 KiB"
    total = by_row["worker-0", "all tiers"]
    assert total[column["hit tokens"]] == "360" and total[column["hit rate"]] == "40.0%" and total[column["evicted (rec.)"]] == "5"
    # worker-1 was not recorded: its memory profile only, nothing under the recording's columns.
    assert by_row["worker-1", "host"][column["evicted (rec.)"]] == "—" and by_row["worker-1", "all tiers"][column["hit tokens"]] == "16"
    assert len([s for s in page.svgs if s["class"] == "chart"]) == 2  # worker-1 has no charts


def test_hostile_strings_are_escaped_and_the_page_is_self_contained():
    page_text = render_report(HOSTILE, {HOSTILE: {"memory_profile": _memory_profile(3, 0, 9), "recording": _recording(transfer_kind=HOSTILE)}})
    assert "<script" not in page_text and "alert('x')" not in page_text
    assert page_text.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;") >= 4  # title, h1, table, section, transfers
    page = _Page(page_text)
    assert page.tags.isdisjoint({"script", "link", "img", "iframe", "object"})
    assert not re.search(r"(src|href)\s*=|url\(|@import", page_text)
    assert set(re.findall(r"https?://[^'\"]+", page_text)) == {"http://www.w3.org/2000/svg"}  # only the SVG namespace


def test_an_engine_profile_reports_its_own_numbers(tiny_llama_dir, tmp_path):
    llm = rayk.LLM(tiny_llama_dir, block_size=BLOCK_SIZE, num_device_blocks=8, host_blocks=8, max_num_seqs=1)
    prompts = random_prompts((40, 45, 50), seed=52)
    with llm.profile() as prof:
        for prompt in prompts + prompts[::-1]:
            llm.generate(prompt, GREEDY)
    prof.export_html(tmp_path / "report.html")
    page_text = (tmp_path / "report.html").read_text()
    stats = llm.stats()
    page = _Page(page_text)
    header, *rows = page.tables[0]
    by_tier = {r[1]: dict(zip(header, r)) for r in rows}
    assert list(by_tier) == ["device", "host", "all tiers"]
    assert by_tier["all tiers"]["hit tokens"] == str(stats["prefix_cache"]["hit_tokens"]) != "0"
    assert by_tier["device"]["hit tokens"] == str(stats["prefix_cache"]["hit_tokens_by_tier"]["device"])
    assert by_tier["host"]["hit tokens"] == str(stats["prefix_cache"]["hit_tokens_by_tier"]["host"]) != "0"
    assert by_tier["device"]["evictions"] == str(stats["device_pool"]["evictions"])
    assert f"{stats['scheduler']['steps']} steps" in page_text
    assert [s["class"] for s in page.svgs] == ["chart", "chart", "heatmap"]
    recording = prof.to_dict()
    assert len(recording["steps"]) == stats["scheduler"]["steps"] and recording["seconds"] > 0


# -- a real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir):
    with local_ray_nodes(NAMESPACE, 2):
        with rayk.Cluster(str(tiny_llama_dir), num_workers=2, device="cpu", namespace=NAMESPACE, block_size=BLOCK_SIZE) as cluster:
            yield cluster


def test_a_cluster_profile_records_every_worker_while_traffic_runs(cluster, tmp_path):
    before = {w: s["scheduler"]["steps"] for w, s in cluster.stats()["workers"].items()}
    prefixes = random_prompts([50, 50], seed=1200)
    questions = random_prompts([3, 4, 5, 6], seed=1201)
    finished = {}

    def traffic():
        time.sleep(0.5)  # after the profilers started (a control call takes milliseconds)
        for i, worker in enumerate(("worker-0", "worker-1")):
            for question in questions[2 * i : 2 * i + 2]:  # the second prompt hits the shared prefix
                cluster.generate(prefixes[i] + question, GREEDY, worker=worker)
        finished["at"] = time.monotonic()

    sender = threading.Thread(target=traffic)
    sender.start()
    # Four tiny requests take about 0.1 s here: 3 s leave room for a loaded machine.
    result = cluster.export_profile(tmp_path / "cluster.html", seconds=3)
    returned = time.monotonic()
    sender.join(timeout=60)
    assert finished["at"] < returned, "the traffic outlasted the recording"

    stats = cluster.stats()["workers"]
    assert sorted(result["workers"]) == ["worker-0", "worker-1"] and result["seconds"] == 3.0
    page_text = (tmp_path / "cluster.html").read_text()
    page = _Page(page_text)
    header, *rows = page.tables[0]
    totals = {r[0]: dict(zip(header, r)) for r in rows if r[1] == "all tiers"}
    for worker, profile in result["workers"].items():
        recording = profile["recording"]
        steps = stats[worker]["scheduler"]["steps"] - before[worker]
        assert 0 < len(recording["steps"]) <= steps and recording["seconds"] >= 3.0
        hits = stats[worker]["prefix_cache"]["hit_tokens"]
        assert hits >= 48 and profile["memory_profile"]["prefix_cache"]["hit_tokens"] == hits
        assert totals[worker]["hit tokens"] == str(hits)
        assert f"<h2>{worker}</h2>" in page_text
    assert [s["class"] for s in page.svgs] == ["chart", "chart", "heatmap"] * 2


def test_a_cluster_profile_of_zero_seconds_holds_the_memory_profiles_only(cluster, tmp_path):
    result = cluster.export_profile(tmp_path / "memory.html", seconds=0, worker="worker-1")
    assert list(result["workers"]) == ["worker-1"] and result["workers"]["worker-1"]["recording"] is None
    page_text = (tmp_path / "memory.html").read_text()
    assert "Not recorded: memory profile only." in page_text and "<svg" not in page_text
    rows = _Page(page_text).tables[0][1:]
    assert [r[:2] for r in rows] == [["worker-1", "device"], ["worker-1", "all tiers"]]


def test_bad_profile_arguments_are_refused_naming_the_field(cluster, tmp_path):
    with pytest.raises(ValueError, match="seconds must be"):
        cluster.export_profile(tmp_path / "x.html", seconds=-1)
    with pytest.raises(ValueError, match="seconds must be"):
        cluster.export_profile(tmp_path / "x.html", seconds=True)
    with pytest.raises(ValueError, match="unknown worker 'worker-9'"):
        cluster.export_profile(tmp_path / "x.html", seconds=0, worker="worker-9")
    with pytest.raises(ValueError, match="worker must be None"):
        cluster.export_profile(tmp_path / "x.html", seconds=0, worker=0)
    with pytest.raises(ValueError, match="path .* does not exist"):
        cluster.export_profile(tmp_path / "missing" / "x.html", seconds=0)
    assert not (tmp_path / "x.html").exists()
