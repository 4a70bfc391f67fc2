"""The hostile-input benchmark (``benchmarks/hostile.py``, issue 15): a quick run of one or two
attacks per class, each in its own child under a memory limit and a timeout, is refused or
skipped in bounded time and memory, touches nothing outside rayk's directories, and leaves an
engine serving the reference tokens; and a bound the attack cannot meet fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "hostile.py"
CHECKS = {"bounded", "as_expected", "untouched", "correct_tokens"}


def _run(*options: str, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *options, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)


def test_a_quick_run_refuses_or_skips_every_attack_and_keeps_serving(tmp_path):
    out = tmp_path / "hostile.json"
    result = _run("--quick", out=out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["attacks"]
    assert report["passed"] and report["sentinel_unchanged"] and not report["failed"]
    assert {r["attack"] for r in rows} == set(report["config"]["selected"]) and len(rows) >= 8
    for row in rows:
        assert set(row["checks"]) == CHECKS and all(row["checks"].values()), row
        assert row["tokens"] == report["reference"]["tokens"], row
        if row["expected"] == "refused":
            assert row["outcome"] == "refused" and row["error_type"] in ("ValueError", "TypeError"), row
        else:
            assert row["outcome"] == "served" and row["error"] is None, row
    by_name = {r["attack"]: r for r in rows}
    assert by_name["disk_foreign_files"]["planted"] >= 5 and not by_name["disk_foreign_files"]["planted_changed"]
    assert by_name["disk_fifo_at_start"]["detail"]["disk_tier"]["skipped_entries"] >= 2
    assert by_name["disk_nan_segment"]["detail"]["disk_tier"]["rejected"] >= 1
    assert by_name["snapshot_planted_junk"]["num_cached_tokens"] > 0  # the sound blocks beside the junk are served
    assert "| gguf_array_count_bomb | refused: ValueError:" in result.stdout


def test_an_attack_over_its_bound_fails_the_run(tmp_path):
    out = tmp_path / "hostile.json"
    result = _run("--attacks", "text_template_nested_loops", "--max-attack-s", "0.5", out=out)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    [row] = json.loads(out.read_text())["attacks"]
    assert row["outcome"] == "refused" and row["attack_s"] > 0.5  # refused, but only after the 2 s render limit
    assert row["checks"] == {"bounded": False, "as_expected": True, "untouched": True, "correct_tokens": True}
    assert "FAILED: ['text_template_nested_loops']" in result.stdout
