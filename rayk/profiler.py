"""Recording what the KV cache does while an engine runs, and exporting it.

    with llm.profile() as prof:
        llm.generate(prompts, params)
    prof.export_chrome_trace("trace.json")   # chrome://tracing or ui.perfetto.dev
    prof.export_html("report.html")          # occupancy per tier, hit rate, block-access heatmap

Recorded per step: its span and batch, a snapshot of each tier's occupancy and the cumulative
hit rate, and which device blocks attention read. Recorded as they happen: every batched copy
between tiers (demote, onload, offload, prefetch) and every batch of evictions per tier.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rayk.cache.events import BlocksRemoved

_PALETTE = {"device": "#1f77b4", "host": "#ff7f0e", "disk": "#2ca02c", "hit rate": "#d62728"}


@dataclass
class _Recording:
    steps: list[dict] = field(default_factory=list)
    transfers: list[dict] = field(default_factory=list)
    evictions: list[dict] = field(default_factory=list)
    accesses: list[list[int]] = field(default_factory=list)


class Profiler:
    """A context manager over one ``LLMEngine``; times are seconds since it was entered."""

    def __init__(self, engine):
        self.engine = engine
        self.recording = _Recording()
        self._origin = 0.0
        self._tables: list[int] = []

    def __enter__(self) -> Profiler:
        self._origin = time.perf_counter()
        self.engine.step_observers.append(self)
        self.engine.cache.chain.transfer_observers.append(self._on_transfer)
        self.engine.subscribe(self._on_events)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.step_observers.remove(self)
        self.engine.cache.chain.transfer_observers.remove(self._on_transfer)
        self.engine.unsubscribe(self._on_events)

    # -- recording ----------------------------------------------------------------------------

    def before_step(self, engine, batch) -> None:
        manager = engine.kv_cache_manager
        self._tables = sorted({b for r in batch.requests for b in manager.block_ids(r.request_id)})

    def after_step(self, engine, batch, start: float, end: float) -> None:
        manager = engine.kv_cache_manager
        occupancy = {"device": engine.pool.num_cached_blocks, "device_used": engine.pool.num_used_blocks}
        if manager.host is not None:
            occupancy["host"] = manager.host.pool.num_cached_blocks
        if manager.disk is not None:
            occupancy["disk"] = len(manager.disk)
        query = manager.num_query_tokens
        self.recording.steps.append(
            {
                "start": start - self._origin,
                "end": end - self._origin,
                "requests": len(batch),
                "tokens": sum(batch.num_new_tokens),
                "occupancy": occupancy,
                "hit_rate": manager.num_hit_tokens / query if query else 0.0,
            }
        )
        self.recording.accesses.append(self._tables)

    def _on_transfer(self, kind, source, target, num_blocks, num_bytes, start, end) -> None:
        self.recording.transfers.append(
            {"kind": kind, "source": source, "target": target, "blocks": num_blocks, "bytes": num_bytes, "start": start - self._origin, "end": end - self._origin}
        )

    def _on_events(self, batch) -> None:
        now = time.perf_counter() - self._origin
        for event in batch.events:
            if isinstance(event, BlocksRemoved):
                self.recording.evictions.append({"tier": event.tier, "blocks": len(event.block_hashes), "time": now})

    # -- Chrome trace -------------------------------------------------------------------------

    def chrome_trace(self) -> dict:
        """The recording in the Trace Event Format (microseconds)."""
        us = 1e6
        events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "rayk engine"}}]
        for step in self.recording.steps:
            events.append(_span("step", "engine", 1, step["start"], step["end"], {"requests": step["requests"], "tokens": step["tokens"]}))
            events.append({"name": "occupancy (cached blocks)", "ph": "C", "pid": 1, "ts": step["end"] * us, "args": step["occupancy"]})
            events.append({"name": "hit rate", "ph": "C", "pid": 1, "ts": step["end"] * us, "args": {"hit_rate": step["hit_rate"]}})
        for t in self.recording.transfers:
            name = f"{t['kind']} {t['source']}->{t['target']}"
            events.append(_span(name, "transfer", 2, t["start"], t["end"], {"blocks": t["blocks"], "bytes": t["bytes"]}))
        for e in self.recording.evictions:
            events.append({"name": "evict", "cat": "cache", "ph": "i", "s": "p", "pid": 1, "tid": 3, "ts": e["time"] * us, "args": {"tier": e["tier"], "blocks": e["blocks"]}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def export_chrome_trace(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.chrome_trace()))

    # -- HTML report --------------------------------------------------------------------------

    def export_html(self, path: str | Path) -> None:
        """A self-contained page: occupancy per tier, hit-rate timeline, block-access heatmap."""
        steps = self.recording.steps
        times = [s["end"] for s in steps]
        tiers = [t for t in ("device", "host", "disk") if any(t in s["occupancy"] for s in steps)]
        occupancy = {t: [s["occupancy"].get(t, 0) for s in steps] for t in tiers}
        moved = sum(t["bytes"] for t in self.recording.transfers)
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>rayk KV cache profile</title>",
            "<style>body{font-family:sans-serif;margin:2em}svg{border:1px solid #ccc;margin-bottom:1em}</style></head><body>",
            "<h1>rayk KV cache profile</h1>",
            f"<p>{len(steps)} steps, {len(self.recording.transfers)} transfers ({moved / 2**20:.2f} MiB), "
            f"{sum(e['blocks'] for e in self.recording.evictions)} evictions.</p>",
            "<h2>Cached blocks per tier</h2>",
            _line_chart(times, occupancy, "seconds", "blocks"),
            "<h2>Prefix-cache hit rate</h2>",
            _line_chart(times, {"hit rate": [s["hit_rate"] for s in steps]}, "seconds", "hit rate"),
            "<h2>Device block accesses</h2><p>Steps run left to right, block ids top to bottom; a cell is darker the more blocks in it attention read.</p>",
            _heatmap(self.recording.accesses, self.engine.pool.num_blocks),
            "</body></html>",
        ]
        Path(path).write_text("\n".join(parts))


def _span(name: str, category: str, track: int, start: float, end: float, args: dict) -> dict:
    """A complete ("X") trace event; times in seconds, written in microseconds."""
    return {"name": name, "cat": category, "ph": "X", "pid": 1, "tid": track, "ts": start * 1e6, "dur": (end - start) * 1e6, "args": args}


def _line_chart(xs: list[float], series: dict[str, list[float]], x_label: str, y_label: str, width=720, height=220) -> str:
    pad = 40
    x_max = max(xs, default=1.0) or 1.0
    y_max = max((max(v, default=0) for v in series.values()), default=1) or 1
    svg = [f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"]
    svg.append(f"<text x='{pad}' y='14' font-size='12'>{html.escape(y_label)} (max {y_max:.3g})</text>")
    svg.append(f"<text x='{width - 8}' y='{height - 6}' font-size='12' text-anchor='end'>{html.escape(x_label)} (max {x_max:.3g})</text>")
    for i, (name, ys) in enumerate(series.items()):
        points = " ".join(f"{pad + (x / x_max) * (width - 2 * pad):.1f},{height - pad - (y / y_max) * (height - 2 * pad):.1f}" for x, y in zip(xs, ys))
        color = _PALETTE.get(name, "#555")
        svg.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{points}'><title>{html.escape(name)}</title></polyline>")
        svg.append(f"<text x='{pad + 90 * i}' y='{height - 22}' font-size='12' fill='{color}'>{html.escape(name)}</text>")
    svg.append("</svg>")
    return "".join(svg)


def _heatmap(accesses: list[list[int]], num_blocks: int, width=720, height=240, max_rows=64, max_cols=180) -> str:
    """Steps left to right, block ids top to bottom, darker where more blocks were read."""
    rows = min(max_rows, num_blocks)
    cols = min(max_cols, max(len(accesses), 1))
    counts = [[0] * cols for _ in range(rows)]
    for step, blocks in enumerate(accesses):
        col = step * cols // max(len(accesses), 1)
        for block in blocks:
            counts[block * rows // num_blocks][col] += 1
    peak = max((max(r) for r in counts), default=0) or 1
    cell_w, cell_h = width / cols, height / rows
    svg = [f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"]
    for r, row in enumerate(counts):
        for c, count in enumerate(row):
            if count:
                shade = int(255 - 220 * count / peak)
                svg.append(f"<rect x='{c * cell_w:.1f}' y='{r * cell_h:.1f}' width='{cell_w:.1f}' height='{cell_h:.1f}' fill='rgb({shade},{shade},255)'/>")
    svg.append("</svg>")
    return "".join(svg)
