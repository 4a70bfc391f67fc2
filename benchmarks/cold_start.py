"""Cold start of the default model: seconds until ``rayk.LLM()`` and ``rayk.Cluster()`` are ready.

Every run is a fresh Python process, timed from just before it is spawned (so interpreter start
and every import count) to the moment the constructor returns; its exit (which waits for a
conversion-cache write still in progress) does not count. Runs alternate, and each figure is
the median of ``--repeats``:

* ``import``: ``import rayk`` and torch, the floor every start of a model pays (``import rayk``
  alone loads neither torch nor Ray; they come with ``rayk.LLM`` or ``rayk.Cluster``).
* ``LLM cold``: ``rayk.LLM()`` with ``conversion_cache_dir`` an empty directory (the first start
  after install: the GGUF file is parsed and dequantized).
* ``LLM warm``: ``rayk.LLM()`` again on the directory the previous cold run filled.
* ``Cluster``: ``rayk.Cluster(num_workers=2, device="cpu")`` on the warm directory, with an
  embedded Ray on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Ray is started first by
  the same ``ray.init`` call the Cluster makes, so its own start (``import ray`` + ``ray.init``)
  is reported apart from the rest (the coordinator and two workers loading in parallel).

Unlike the other benchmarks there is no baseline in the same run: the goals (from issue 13)
are absolute seconds: LLM cold <= 5 s, LLM warm <= 2 s, Cluster <= 12 s. The first run after
installing also compiles .pyc files and reads the files from disk into the page cache;
``--first-run`` reports that run separately (it is excluded from the medians). Timings on a
shared machine are noisy: the JSON keeps every sample.

    python benchmarks/cold_start.py [--repeats 3] [--no-cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cold_start.json"
GOALS_S = {"LLM cold": 5.0, "LLM warm": 2.0, "Cluster": 12.0}

# Each child prints one JSON line; ``SPAWNED`` is the parent's time.time() just before spawning.
_PRELUDE = "import json, sys, time\nSPAWNED = float(sys.argv[1])\n"
IMPORT_SCRIPT = _PRELUDE + "import rayk\nimport torch\nprint(json.dumps({'ready_s': time.time() - SPAWNED}))\n"
LLM_SCRIPT = _PRELUDE + (
    "import rayk\n"
    "imported_s = time.time() - SPAWNED\n"
    "llm = rayk.LLM(conversion_cache_dir=sys.argv[2])\n"
    "ready_s = time.time() - SPAWNED\n"
    "heavy = sorted(m for m in ('transformers', 'gguf', 'triton', 'torch._dynamo') if m in sys.modules)\n"
    "print(json.dumps({'ready_s': ready_s, 'import_s': imported_s, 'heavy_modules': heavy}))\n"
)
CLUSTER_SCRIPT = _PRELUDE + (
    "import ray\n"
    "ray.init(address='local', namespace='rayk-bench', _node_ip_address='127.0.0.1', include_dashboard=False, log_to_driver=False)\n"
    "ray_s = time.time() - SPAWNED\n"
    "import rayk\n"
    "cluster = rayk.Cluster(num_workers=2, device='cpu', namespace='rayk-bench', conversion_cache_dir=sys.argv[2])\n"
    "ready_s = time.time() - SPAWNED\n"
    "cluster.shutdown()\n"
    "ray.shutdown()\n"
    "print(json.dumps({'ready_s': ready_s, 'ray_s': ray_s}))\n"
)


def run(script: str, *args: str, timeout_s: float = 300) -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    spawned = time.time()
    result = subprocess.run([sys.executable, "-c", script, repr(spawned), *args], capture_output=True, text=True, env=env, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    sample = json.loads(result.stdout.strip().splitlines()[-1])
    sample["progress_lines"] = [line for line in result.stderr.splitlines() if line.startswith("rayk:")]
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind (medians are reported)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the rayk.Cluster runs (each starts Ray)")
    parser.add_argument("--first-run", action="store_true", help="also report one cold run before the repeats (.pyc and page cache cold)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    kinds = ["import", "LLM cold", "LLM warm"] + ([] if args.no_cluster else ["Cluster"])
    samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
    first = None
    with tempfile.TemporaryDirectory(prefix="rayk-cold-start-") as scratch:
        if args.first_run:
            first = run(LLM_SCRIPT, str(Path(scratch) / "first"))
            print(f"first run: {first['ready_s']:.2f} s")
        for repeat in range(args.repeats):
            cache_dir = str(Path(scratch) / f"cache-{repeat}")  # empty: a cold start
            samples["import"].append(run(IMPORT_SCRIPT))
            samples["LLM cold"].append(run(LLM_SCRIPT, cache_dir))
            samples["LLM warm"].append(run(LLM_SCRIPT, cache_dir))
            if not args.no_cluster:
                samples["Cluster"].append(run(CLUSTER_SCRIPT, cache_dir))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{kind} {samples[kind][-1]['ready_s']:.2f} s" for kind in kinds), flush=True)

    rows = []
    for kind in kinds:
        values = [s["ready_s"] for s in samples[kind]]
        row = {"kind": kind, "median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
        if kind in GOALS_S:
            row["goal_s"] = GOALS_S[kind]
            row["pass"] = row["median_s"] <= GOALS_S[kind]
        if kind == "Cluster":
            row["ray_start_median_s"] = statistics.median(s["ray_s"] for s in samples[kind])
        rows.append(row)
    header = "| start | median s | min s | max s | goal s | result |\n|---|---|---|---|---|---|"
    lines = []
    for row in rows:
        goal = f"{row['goal_s']:.0f}" if "goal_s" in row else "-"
        verdict = ("PASS" if row["pass"] else "FAIL") if "pass" in row else "-"
        lines.append(f"| {row['kind']} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} | {goal} | {verdict} |")
    print(header + "\n" + "\n".join(lines))
    for row in rows:
        if "ray_start_median_s" in row:
            print(f"Cluster: Ray's own start (import ray + ray.init) {row['ray_start_median_s']:.2f} s of {row['median_s']:.2f} s")
    environment = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": vars(args), "environment": environment, "first_run": first, "rows": rows, "samples": samples}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
