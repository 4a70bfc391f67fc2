"""The KV-cache memory report: one self-contained HTML page (inline SVG; no script, no font, no
link) for one engine or for every worker of a cluster.

The input is plain data, one entry per worker name (one entry, "engine", for a single process):
``{"memory_profile": LLMEngine.memory_profile(), "recording": Profiler.to_dict() or None}``
(``rayk.profiler.take_profile`` builds it). The page holds:

- a summary table, one row per worker and tier (device, host, disk; remote when peers served
  hits) and one with the worker's totals: blocks used, cached and free, bytes, hit tokens and hit
  rate, fragmentation and evictions from the memory profile (cumulative since the worker
  started), and the evictions and transfers of the recording;
- per worker, charts of its recording: cached blocks per tier and the cumulative prefix-cache hit
  rate against seconds since the recording started, and the device blocks attention read per
  step as a heatmap with its colour scale; then its transfers by kind.

Charts have ticks at 1-2-5 steps with values and units on both axes and a legend. Every string
taken from the data is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict

from rayk.cache.events import STORED_TIERS

# Occupancy series: (key in a step's "occupancy", legend label, colour, dashed).
_OCCUPANCY_SERIES = (
    ("device", "device cached", "#1f77b4", False),
    ("device_used", "device in use", "#1f77b4", True),
    ("host", "host cached", "#ff7f0e", False),
    ("disk", "disk cached", "#2ca02c", False),
)
_HEAT_RAMP = ((222, 235, 247), (107, 174, 214), (8, 48, 107))  # light blue to dark blue
_STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}"
    "th{background:#f3f3f3}.name{text-align:left;white-space:nowrap}tr.total td{font-weight:bold;background:#fafafa}"
    "svg{display:block;margin:0.3em 0 1.2em}section{border-top:2px solid #ddd;margin-top:2em}"
    "p.note{color:#555;font-size:13px}"
)


def render_report(title: str, profiles: dict[str, dict]) -> str:
    """The page for ``profiles`` (worker name -> its memory profile and recording), in the
    order given."""
    if not profiles:
        raise ValueError("profiles must hold at least one worker's profile")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<h2>Summary per worker and tier</h2>",
        "<p class='note'>Blocks, bytes, hits, fragmentation and evictions are each worker's state when the "
        "report was taken (counts since it started); the last three columns are what happened while it was recorded. "
        "Cached blocks hold a prefix others may reuse; free blocks include the cached ones no request uses. "
        "An export read from several tiers at once counts as moved out of each.</p>",
        summary_table(profiles),
    ]
    for name, profile in profiles.items():
        parts.append(_worker_section(name, profile))
    parts.append("</body></html>")
    return "\n".join(parts)


# -- tables ------------------------------------------------------------------------------------

_SUMMARY_COLUMNS = (
    "worker", "tier", "blocks", "used", "cached", "free", "bytes used / total", "hit tokens", "hit rate",
    "internal frag.", "external frag.", "evictions", "evicted (rec.)", "moved in (rec.)", "moved out (rec.)",
)


def summary_table(profiles: dict[str, dict]) -> str:
    """One row per worker and tier, then the worker's totals (``tr.total``)."""
    rows = ["<table class='summary'><tr>" + "".join(f"<th class='name'>{c}</th>" if i < 2 else f"<th>{c}</th>" for i, c in enumerate(_SUMMARY_COLUMNS)) + "</tr>"]
    for name, profile in profiles.items():
        memory, recording = profile["memory_profile"], profile.get("recording")
        moves = _moves_by_tier(recording)
        evicted = _evicted_by_tier(recording)
        for tier in STORED_TIERS:
            if tier in memory:
                rows.append(_row(name, tier, _tier_cells(memory[tier], tier, recording, moves, evicted)))
        prefix = memory["prefix_cache"]
        remote_hits = prefix["hit_tokens"] - sum(memory[t]["hit_tokens"] for t in STORED_TIERS if t in memory)
        if remote_hits or "remote" in moves:
            cells = ["—"] * 5 + [_int(remote_hits), _percent(remote_hits / prefix["query_tokens"] if prefix["query_tokens"] else 0.0)]
            cells += ["—"] * 4 + _move_cells("remote", recording, moves)
            rows.append(_row(name, "remote", cells))
        rate = prefix["hit_tokens"] / prefix["query_tokens"] if prefix["query_tokens"] else 0.0
        total_evicted = sum(evicted.values()) if recording is not None else None
        moved = sum(t["blocks"] for t in recording["transfers"]) if recording is not None else None
        cells = ["—"] * 5 + [_int(prefix["hit_tokens"]), _percent(rate), "—", "—", "—", _opt_int(total_evicted), _opt_int(moved, " blocks"), "—"]
        rows.append(_row(name, "all tiers", cells, css="total"))
    rows.append("</table>")
    return "".join(rows)


def _tier_cells(tier_profile: dict, tier: str, recording, moves, evicted) -> list[str]:
    if tier == "disk":
        blocks = tier_profile["cached_blocks"]
        counts = ["—", _int(blocks), _int(blocks), "—"]
        internal, external, evictions = "—", "—", "—"
    else:
        physical = tier_profile["physical_blocks"]
        used = physical["total"] - physical["free"] - physical["reserved"]
        counts = [_int(physical["total"]), _int(used), _int(physical["cached"]), _int(physical["free"])]
        internal = _percent(tier_profile["internal_fragmentation"]["fraction"]) if "internal_fragmentation" in tier_profile else "—"
        external = f"{tier_profile['external_fragmentation']['index']:.2f}"
        evictions = _int(tier_profile["evictions"])
    cells = counts + [
        f"{format_bytes(tier_profile['used_bytes'])} / {format_bytes(tier_profile['total_bytes'])}",
        _int(tier_profile["hit_tokens"]),
        _percent(tier_profile["hit_rate"]),
        internal,
        external,
        evictions,
        _opt_int(evicted.get(tier, 0) if recording is not None else None),
    ]
    return cells + _move_cells(tier, recording, moves)


def _move_cells(tier: str, recording, moves) -> list[str]:
    if recording is None:
        return ["—", "—"]
    entry = moves.get(tier, {"in": 0, "in_bytes": 0, "out": 0, "out_bytes": 0})
    return [f"{entry['in']} blocks, {format_bytes(entry['in_bytes'])}", f"{entry['out']} blocks, {format_bytes(entry['out_bytes'])}"]


def _moves_by_tier(recording) -> dict[str, dict]:
    """Blocks and bytes each tier received and sent in the recorded transfers; a source such as
    "device+host" (one export from both) counts under each of its tiers."""
    moves: dict[str, dict] = defaultdict(lambda: {"in": 0, "in_bytes": 0, "out": 0, "out_bytes": 0})
    for t in recording["transfers"] if recording else ():
        for source in str(t["source"]).split("+"):
            moves[source]["out"] += t["blocks"]
            moves[source]["out_bytes"] += t["bytes"]
        moves[str(t["target"])]["in"] += t["blocks"]
        moves[str(t["target"])]["in_bytes"] += t["bytes"]
    return dict(moves)


def _evicted_by_tier(recording) -> dict[str, int]:
    evicted: dict[str, int] = defaultdict(int)
    for e in recording["evictions"] if recording else ():
        evicted[str(e["tier"])] += e["blocks"]
    return dict(evicted)


def _transfer_table(transfers: list[dict]) -> str:
    """The recorded transfers grouped by kind, source and target."""
    groups: dict[tuple, list[float]] = {}
    for t in transfers:
        group = groups.setdefault((t["kind"], t["source"], t["target"]), [0, 0, 0, 0.0])
        group[0] += 1
        group[1] += t["blocks"]
        group[2] += t["bytes"]
        group[3] += t["end"] - t["start"]
    rows = ["<table class='transfers'><tr><th class='name'>kind</th><th class='name'>from</th><th class='name'>to</th><th>copies</th><th>blocks</th><th>bytes</th><th>copy time</th><th>rate</th></tr>"]
    for (kind, source, target), (copies, blocks, num_bytes, seconds) in sorted(groups.items(), key=lambda g: str(g[0])):
        rate = f"{format_bytes(num_bytes / seconds)}/s" if seconds > 0 else "—"
        cells = [kind, source, target, _int(copies), _int(blocks), format_bytes(num_bytes), f"{seconds * 1e3:.2f} ms", rate]
        rows.append("<tr>" + "".join(f"<td class='name'>{_esc(c)}</td>" if i < 3 else f"<td>{_esc(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _row(worker: str, tier: str, cells: list[str], css: str = "") -> str:
    attr = f" class='{css}'" if css else ""
    return f"<tr{attr}><td class='name'>{_esc(worker)}</td><td class='name'>{_esc(tier)}</td>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>"


# -- one worker --------------------------------------------------------------------------------


def _worker_section(name: str, profile: dict) -> str:
    memory, recording = profile["memory_profile"], profile.get("recording")
    prefix = memory["prefix_cache"]
    parts = [
        f"<section><h2>{_esc(name)}</h2>",
        f"<p>Prefix cache: {_int(prefix['hit_tokens'])} of {_int(prefix['query_tokens'])} prompt tokens hit.</p>",
    ]
    if recording is None:
        parts.append("<p class='note'>Not recorded: memory profile only.</p></section>")
        return "".join(parts)
    steps = recording["steps"]
    moved = sum(t["bytes"] for t in recording["transfers"])
    parts.append(
        f"<p>Recorded {recording['seconds']:.3g} s: {_int(len(steps))} steps, {_int(sum(s['tokens'] for s in steps))} tokens, "
        f"{_int(len(recording['transfers']))} transfers ({format_bytes(moved)}), "
        f"{_int(sum(e['blocks'] for e in recording['evictions']))} blocks evicted.</p>"
    )
    if not steps:
        parts.append("<p class='note'>No step ran while this worker was recorded.</p></section>")
        return "".join(parts)
    times = [s["end"] for s in steps]
    series = [
        (label, [s["occupancy"].get(key, 0) for s in steps], color, dashed)
        for key, label, color, dashed in _OCCUPANCY_SERIES
        if any(key in s["occupancy"] for s in steps)
    ]
    parts += [
        "<h3>Cached blocks per tier</h3>",
        line_chart(times, series, x_unit="s", x_title="time since the recording started (s)", y_title="blocks", x_max=recording["seconds"]),
        "<h3>Prefix-cache hit rate</h3>",
        line_chart(
            times,
            [("cumulative hit rate", [100 * s["hit_rate"] for s in steps], "#d62728", False)],
            x_unit="s",
            x_title="time since the recording started (s)",
            y_title="hit rate (%)",
            y_unit="%",
            x_max=recording["seconds"],
            y_max=100,
        ),
        "<h3>Device block accesses</h3>",
        heatmap(recording["accesses"], recording["num_device_blocks"]),
        "<h3>Transfers</h3>",
        _transfer_table(recording["transfers"]) if recording["transfers"] else "<p class='note'>None recorded.</p>",
        "</section>",
    ]
    return "".join(parts)


# -- charts ------------------------------------------------------------------------------------


def nice_ticks(top: float, target: int = 5) -> list[float]:
    """Ticks from 0 to at least ``top``, about ``target`` of them, spaced 1, 2 or 5 × 10^k."""
    if not top > 0:
        return [0.0, 1.0]
    raw = top / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def line_chart(
    xs: list[float],
    series: list[tuple[str, list[float], str, bool]],
    *,
    x_unit: str,
    x_title: str,
    y_title: str,
    y_unit: str = "",
    x_max: float = 0.0,
    y_max: float | None = None,
    width: int = 760,
    height: int = 270,
) -> str:
    """Lines of ``(label, ys, colour, dashed)`` over ``xs``, both axes from 0 (x to at least
    ``x_max``, y to at least ``y_max``), with gridlines, ticks labelled with their value and unit,
    axis titles and a legend above the plot."""
    left, right, top, bottom = 64, 20, 34, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    x_ticks = nice_ticks(max([x_max, *xs]))
    y_ticks = nice_ticks(y_max if y_max is not None else max((max(ys, default=0) for _, ys, _, _ in series), default=0))
    x_top, y_top = x_ticks[-1], y_ticks[-1]

    def px(x: float) -> float:
        return left + x / x_top * plot_w

    def py(y: float) -> float:
        return top + plot_h - y / y_top * plot_h

    svg = [f"<svg class='chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg' font-size='11'>"]
    svg += _axes(left, top, plot_w, plot_h, x_ticks, y_ticks, px, py, x_unit, y_unit, x_title, y_title)
    for label, ys, color, dashed in series:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        dash = " stroke-dasharray='5,3'" if dashed else ""
        svg.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.8'{dash} points='{points}'><title>{_esc(label)}</title></polyline>")
    svg += _legend(left, 14, [(label, color, dashed) for label, _, color, dashed in series])
    svg.append("</svg>")
    return "".join(svg)


def heatmap(accesses: list[list[int]], num_blocks: int, width: int = 760, height: int = 300, max_rows: int = 64, max_cols: int = 160) -> str:
    """Steps left to right, device block ids top to bottom; a cell's colour is how many (step,
    block) reads fall in it (a cell spans several steps or blocks when there are more than
    ``max_cols`` steps or ``max_rows`` blocks), on the scale at the right."""
    left, right, top, bottom = 64, 110, 14, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    num_steps = max(len(accesses), 1)
    rows, cols = max(1, min(max_rows, num_blocks)), min(max_cols, num_steps)
    counts = [[0] * cols for _ in range(rows)]
    for step, blocks in enumerate(accesses):
        col = step * cols // num_steps
        for block in blocks:
            counts[block * rows // num_blocks][col] += 1
    peak = max((max(r) for r in counts), default=0)
    # The axes end at the last step and the last block, not at a round number past them.
    x_ticks = [t for t in nice_ticks(num_steps) if t <= num_steps]
    y_ticks = [t for t in nice_ticks(num_blocks) if t <= num_blocks]

    def px(step: float) -> float:
        return left + step / num_steps * plot_w

    def py(block: float) -> float:
        return top + block / num_blocks * plot_h  # block 0 at the top

    svg = [f"<svg class='heatmap' width='{width}' height='{height}' viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg' font-size='11'>"]
    step_span, block_span = num_steps / cols, num_blocks / rows
    for r, row in enumerate(counts):
        for c, count in enumerate(row):
            if count:
                x0, x1 = px(c * step_span), px((c + 1) * step_span)
                y0, y1 = py(r * block_span), py((r + 1) * block_span)
                svg.append(f"<rect x='{x0:.1f}' y='{y0:.1f}' width='{x1 - x0:.2f}' height='{y1 - y0:.2f}' fill='{_heat_colour((count - 1) / (peak - 1) if peak > 1 else 1.0)}' shape-rendering='crispEdges'/>")
    svg += _axes(left, top, plot_w, plot_h, x_ticks, y_ticks, px, py, "", "", "step since the recording started", "device block id", grid=False)
    svg += _colour_scale(left + plot_w + 24, top, plot_h, peak)
    svg.append("</svg>")
    cell = f"each cell spans {step_span:.3g} step(s) × {block_span:.3g} block(s)"
    return f"<p class='note'>Which device blocks attention read at each step; {cell}; white: not read.</p>" + "".join(svg)


def _axes(left, top, plot_w, plot_h, x_ticks, y_ticks, px, py, x_unit, y_unit, x_title, y_title, grid=True) -> list[str]:
    """The plot frame, gridlines, tick marks, tick labels (value and unit) and axis titles."""
    bottom_y = top + plot_h
    svg = [f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#444'/>"]
    for x in x_ticks:
        X = px(x)
        if grid and 0 < x < x_ticks[-1]:
            svg.append(f"<line x1='{X:.1f}' y1='{top}' x2='{X:.1f}' y2='{bottom_y}' stroke='#e5e5e5'/>")
        svg.append(f"<line x1='{X:.1f}' y1='{bottom_y}' x2='{X:.1f}' y2='{bottom_y + 5}' stroke='#444'/>")
        svg.append(f"<text class='tick x' x='{X:.1f}' y='{bottom_y + 17}' text-anchor='middle'>{_esc(_tick_label(x, x_unit))}</text>")
    for y in y_ticks:
        Y = py(y)
        if grid and 0 < y < y_ticks[-1]:
            svg.append(f"<line x1='{left}' y1='{Y:.1f}' x2='{left + plot_w}' y2='{Y:.1f}' stroke='#e5e5e5'/>")
        svg.append(f"<line x1='{left - 5}' y1='{Y:.1f}' x2='{left}' y2='{Y:.1f}' stroke='#444'/>")
        svg.append(f"<text class='tick y' x='{left - 8}' y='{Y + 4:.1f}' text-anchor='end'>{_esc(_tick_label(y, y_unit))}</text>")
    svg.append(f"<text class='axis-title' x='{left + plot_w / 2:.1f}' y='{bottom_y + 36}' text-anchor='middle'>{_esc(x_title)}</text>")
    mid = top + plot_h / 2
    svg.append(f"<text class='axis-title' x='14' y='{mid:.1f}' text-anchor='middle' transform='rotate(-90 14 {mid:.1f})'>{_esc(y_title)}</text>")
    return svg


def _legend(x: float, y: float, entries: list[tuple[str, str, bool]]) -> list[str]:
    svg = []
    for label, color, dashed in entries:
        dash = " stroke-dasharray='5,3'" if dashed else ""
        svg.append(f"<line x1='{x:.0f}' y1='{y - 4}' x2='{x + 22:.0f}' y2='{y - 4}' stroke='{color}' stroke-width='2.5'{dash}/>")
        svg.append(f"<text class='legend' x='{x + 27:.0f}' y='{y}'>{_esc(label)}</text>")
        x += 40 + 6.5 * len(label)  # room for the label at about 6.5 px a character
    return svg


def _colour_scale(x: float, top: float, height: float, peak: int, bands: int = 40) -> list[str]:
    """A vertical bar from 1 read (bottom) to ``peak`` reads (top) with integer ticks, and a white
    swatch for 0 below it."""
    svg = [f"<text class='scale-title' x='{x}' y='{top + height + 36}'>reads per cell</text>"]
    svg.append(f"<rect x='{x}' y='{top + height + 8}' width='16' height='12' fill='#fff' stroke='#444'/>")
    svg.append(f"<text class='tick scale' x='{x + 24}' y='{top + height + 18}'>0</text>")
    if peak == 0:
        return svg
    if peak == 1:
        svg.append(f"<rect x='{x}' y='{top}' width='16' height='{height}' fill='{_heat_colour(1.0)}' stroke='#444'/>")
        svg.append(f"<text class='tick scale' x='{x + 24}' y='{top + height / 2 + 4:.1f}'>1</text>")
        return svg
    band = height / bands
    for i in range(bands):
        svg.append(f"<rect x='{x}' y='{top + i * band:.2f}' width='16' height='{band + 0.5:.2f}' fill='{_heat_colour(1 - i / (bands - 1))}'/>")
    svg.append(f"<rect x='{x}' y='{top}' width='16' height='{height}' fill='none' stroke='#444'/>")
    ticks = {int(t) for t in nice_ticks(peak, 4) if float(t).is_integer() and 1 <= t <= peak} | {1, peak}
    for value in sorted(ticks):
        Y = top + height * (1 - (value - 1) / (peak - 1))
        svg.append(f"<line x1='{x + 16}' y1='{Y:.1f}' x2='{x + 21}' y2='{Y:.1f}' stroke='#444'/>")
        svg.append(f"<text class='tick scale' x='{x + 24}' y='{Y + 4:.1f}'>{_int(value)}</text>")
    return svg


def _heat_colour(fraction: float) -> str:
    """The ramp's colour at ``fraction`` in [0, 1]."""
    position = min(max(fraction, 0.0), 1.0) * (len(_HEAT_RAMP) - 1)
    i = min(int(position), len(_HEAT_RAMP) - 2)
    low, high, t = _HEAT_RAMP[i], _HEAT_RAMP[i + 1], position - i
    return "rgb({},{},{})".format(*(round(a + (b - a) * t) for a, b in zip(low, high)))


# -- formatting --------------------------------------------------------------------------------


def format_bytes(num_bytes: float) -> str:
    """Bytes in B, KiB, MiB or GiB, three significant digits."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            value = num_bytes / size
            return f"{value:.3g} {unit}" if abs(value) < 1000 else f"{value:.0f} {unit}"  # not 1e+03
    return f"{num_bytes:.0f} B"


def _tick_label(value: float, unit: str) -> str:
    text = str(int(value)) if float(value).is_integer() else f"{value:.6g}"
    if unit == "%":
        return text + "%"
    return f"{text} {unit}" if unit else text


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _int(value) -> str:
    return f"{int(value):,}"


def _opt_int(value, suffix: str = "") -> str:
    return "—" if value is None else _int(value) + suffix


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"
