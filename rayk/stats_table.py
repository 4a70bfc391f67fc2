"""Plain-text tables of a cluster's statistics (``Cluster.stats()``), for the ``rayk`` command.

One row per worker and tier: blocks (total, used, cached, free), bytes, hit tokens served from
that tier and evictions; then one line per worker with its requests and queue, and the router's
hits against the oracle. Pure functions of the stats dict: nothing here talks to Ray.
"""

from __future__ import annotations

from rayk.profile_report import format_bytes

COLUMNS = ("worker", "tier", "blocks", "used", "cached", "free", "bytes", "hit tokens", "evictions")


def tier_rows(worker_id: str, stats: dict) -> list[tuple]:
    """One row per tier the worker has; a column that does not apply to a tier is "-"."""
    hits = stats["prefix_cache"]["hit_tokens_by_tier"]
    pool = stats["device_pool"]
    rows = [(worker_id, "device", pool["num_blocks"], pool["used_blocks"], pool["cached_blocks"], pool["free_blocks"], pool["total_bytes"], hits.get("device", 0), pool["evictions"])]
    host = stats.get("host_tier")
    if host:
        rows.append((worker_id, "host", host["num_blocks"], "-", host["cached_blocks"], host["num_blocks"] - host["cached_blocks"], host["total_bytes"], hits.get("host", 0), host["evictions"]))
    disk = stats.get("disk_tier")
    if disk:
        rows.append((worker_id, "disk", "-", "-", disk["cached_blocks"], "-", disk["used_bytes"], hits.get("disk", 0), disk["evictions"]))
    transfers = stats.get("transfers") or {}
    rows.append((worker_id, "remote", "-", "-", "-", "-", transfers.get("pulled_bytes", 0), hits.get("remote", 0), "-"))
    return rows


def format_table(header: tuple, rows: list[tuple]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, byte counts humanized."""
    cells = [[str(h) for h in header]] + [[_cell(header[i], v) for i, v in enumerate(row)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_right_aligned(row[i]) for row in rows) if rows else False for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def render_stats(stats: dict) -> str:
    """The whole ``rayk stats`` view: tiers per worker, requests per worker, routing."""
    workers = stats["workers"]
    parts = [format_table(COLUMNS, [row for w in sorted(workers) for row in tier_rows(w, workers[w])])]
    request_rows = []
    for worker_id in sorted(workers):
        w = workers[worker_id]
        prefix = w["prefix_cache"]
        request_rows.append(
            (worker_id, w["requests"]["finished"], w["scheduler"]["waiting"], w["scheduler"]["running"], prefix["query_tokens"], prefix["hit_tokens"], f"{prefix['hit_rate']:.1%}")
        )
    parts.append(format_table(("worker", "requests", "waiting", "running", "prompt tokens", "hit tokens", "hit rate"), request_rows))
    parts.append(routing_line(stats["routing"]))
    for worker_id, error in sorted(stats.get("unavailable_workers", {}).items()):
        parts.append(f"{worker_id}: unavailable ({error})")
    return "\n\n".join(parts)


def routing_line(routing: dict) -> str:
    """The router's hits against the oracle (every cached token some worker held when routed)."""
    actual, oracle = routing["actual_hit_tokens"], routing["oracle_hit_tokens"]
    share = f" ({actual / oracle:.0%} of the oracle)" if oracle else ""
    return f"routing: {actual} hit tokens of the {oracle} the cluster held{share}"


def _cell(column: str, value) -> str:
    if column == "bytes" and _is_number(value):
        return format_bytes(value)
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _right_aligned(value) -> bool:
    """Numbers, and the "-" of a number column that does not apply."""
    return _is_number(value) or value == "-"
