"""Recording what the KV cache does while an engine runs, and exporting it.

    with llm.profile() as prof:
        llm.generate(prompts, params)
    prof.export_chrome_trace("trace.json")   # chrome://tracing or ui.perfetto.dev
    prof.export_html("report.html")          # occupancy per tier, hit rate, block-access heatmap

Recorded per step: its span and batch, a snapshot of each tier's occupancy and the cumulative
hit rate, and which device blocks attention read. Recorded as they happen: every batched copy
between tiers (demote, onload, offload, prefetch) and every batch of evictions per tier.

A cluster worker cannot hold a ``with`` block open across two driver calls: its controls
``start_profile`` and ``take_profile`` run ``start_profiling`` and ``take_profile`` below on the
engine's thread, and the driver renders what the workers return (``Cluster.export_profile``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rayk.cache.events import BlocksRemoved
from rayk.profile_report import render_report


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
        self._stopped_at: float | None = None
        self._tables: list[int] = []

    def __enter__(self) -> Profiler:
        self._origin = time.perf_counter()
        self._stopped_at = None
        self.engine.step_observers.append(self)
        self.engine.cache.chain.transfer_observers.append(self._on_transfer)
        self.engine.subscribe(self._on_events)
        return self

    def __exit__(self, *exc) -> None:
        self._stopped_at = time.perf_counter()
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

    # -- plain data and the HTML report --------------------------------------------------------

    def to_dict(self) -> dict:
        """The recording as plain data (lists, dicts, numbers, strings): ``steps``,
        ``transfers``, ``evictions`` and ``accesses`` as recorded (times in seconds since the
        profiler started), ``num_device_blocks`` (the heatmap's height) and ``seconds``, how
        long it has recorded (until it stopped, or until now)."""
        recording = self.recording
        end = self._stopped_at if self._stopped_at is not None else time.perf_counter()
        return {
            "steps": list(recording.steps),
            "transfers": list(recording.transfers),
            "evictions": list(recording.evictions),
            "accesses": list(recording.accesses),
            "num_device_blocks": self.engine.pool.num_blocks,
            "seconds": end - self._origin,
        }

    def export_html(self, path: str | Path) -> None:
        """A self-contained page (see ``rayk.profile_report``): the summary table of the engine's
        memory profile now, and the charts of the recording."""
        report = render_report("rayk KV cache profile", {"engine": {"memory_profile": self.engine.memory_profile(), "recording": self.to_dict()}})
        Path(path).write_text(report, encoding="utf-8")


def start_profiling(engine) -> None:
    """Starts a ``Profiler`` on ``engine`` that ``take_profile`` stops; one left running (by a
    caller that never took it) is stopped and dropped first. Runs on the engine's thread."""
    running = _running_profiler(engine)
    if running is not None:
        running.__exit__(None, None, None)
    Profiler(engine).__enter__()


def take_profile(engine) -> dict:
    """Stops the profiler ``start_profiling`` started, if one runs, and returns
    ``{"memory_profile": engine.memory_profile(), "recording": its to_dict() or None}``: the
    input of ``rayk.profile_report.render_report`` for one worker. Runs on the engine's thread."""
    running = _running_profiler(engine)
    if running is not None:
        running.__exit__(None, None, None)
    return {"memory_profile": engine.memory_profile(), "recording": running.to_dict() if running is not None else None}


def _running_profiler(engine) -> Profiler | None:
    """The profiler among the engine's step observers (the engine owns that list)."""
    return next((o for o in engine.step_observers if isinstance(o, Profiler)), None)


def _span(name: str, category: str, track: int, start: float, end: float, args: dict) -> dict:
    """A complete ("X") trace event; times in seconds, written in microseconds."""
    return {"name": name, "cat": category, "ph": "X", "pid": 1, "tid": track, "ts": start * 1e6, "dur": (end - start) * 1e6, "args": args}
