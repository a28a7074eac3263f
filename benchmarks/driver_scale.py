"""Driver scale: rows/s through one driver and its peak memory, 20 000 vs 200 000 inputs (issue 13).

Every input is an empty file, so every row is a typed error (``empty``) and no model runs: what is measured
is the job's own per-row overhead -- listing, Ray Data blocks, the stages passing rows along, manifest
parts, the driver's bookkeeping. Each size runs in a fresh process with its own local Ray, through the CLI's
code path (``run_job``, executor ray, fuse auto). Files sit in folders of 1 000, as large corpora are
sharded; the listing holds one folder at a time.

    .venv/bin/python benchmarks/driver_scale.py [--sizes 20000,200000] [--executor ray] [--models DIR]

Prints one JSON line: rows/s and driver peak RSS per size, and the RSS growth between the smallest and the
largest size (issue 13's targets on the 2-core machine: >= 2 000 rows/s, growth <= 100 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import ray
from promptpaint.config import build_spec, EditSpec
from promptpaint.jobs.bulk_edit import run_job

spec = build_spec(EditSpec, json.loads(sys.argv[1]))
if spec.runtime.executor == "ray":
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
result = run_job(spec, progress=False)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"rows": result.inputs, "seconds": round(seconds, 2),
      "rows_per_s": round(result.inputs / seconds, 1), "driver_peak_rss_mb": round(peak, 1),
      "rss_before_job_mb": round(base, 1), "errors": result.errors,
      "parts": result.summary.get("manifest_parts_written")}))
ray.shutdown()
"""


def make_corpus(folder: Path, n: int, per_folder: int = 1000) -> None:
    for i in range(n):
        sub = folder / f"shard-{i // per_folder:05d}"
        if i % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        os.close(os.open(sub / f"img-{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def run_size(work: Path, n: int, executor: str, models: str) -> dict:
    inputs, out = work / f"in-{n}", work / f"out-{n}"
    t0 = time.perf_counter()
    make_corpus(inputs, n)
    made = time.perf_counter() - t0
    spec = {
        "input": str(inputs),
        "output": str(out),
        "models_dir": models,
        "detect": {"queries": ["a car"]},
        "inpaint": {"prompt": "a red vintage bicycle", "steps": 2},
        "limits": {"max_error_rate": None},  # every row is an input error: no breaker
        "runtime": {"executor": executor},
        "lineage": {"mode": "off"},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"size {n} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[0][7:]), "corpus_seconds": round(made, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--models", default=str(ROOT / ".models" / "tiny"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="pp-driver-scale-") as tmp:
        runs = {n: run_size(Path(tmp), n, args.executor, args.models) for n in sizes}
    lo, hi = runs[min(sizes)], runs[max(sizes)]
    print(json.dumps({
        "benchmark": "driver_scale",
        "executor": args.executor,
        "cpus": os.cpu_count(),
        "runs": runs,
        "rows_per_s_at_largest": hi["rows_per_s"],
        "driver_rss_growth_mb": round(hi["driver_peak_rss_mb"] - lo["driver_peak_rss_mb"], 1),
        "targets": {"rows_per_s": 2000, "driver_rss_growth_mb": 100},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
