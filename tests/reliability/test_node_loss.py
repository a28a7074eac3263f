"""Node loss and driver kill on a real multi-node Ray (issue 13): every input exactly once in the manifest after a
worker node is removed mid-job (and the job re-run if Ray could not finish it), and after the driver of a Ray-
executor job is killed and the command re-run. Figures go to stdout as RESULT lines (and RELIABILITY.md via
benchmarks/reliability_report.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_kit import record

from promptpaint import manifest
from tests.test_hardening import EQUAL, ROOT, photos, raw_rows, short_tmp, stop_ray_under, sub_env

pytestmark = [pytest.mark.heavy, pytest.mark.reliability]

NODE_LOSS_SCRIPT = """
import json, resource, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from promptpaint.config import EditSpec, build_spec
from promptpaint.jobs.bulk_edit import run_job

spec = build_spec(EditSpec, json.loads(sys.argv[1]))
node = {"num_cpus": 2, "object_store_memory": 80 * 1024**2}
cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
report = {"nodes": 3, "kills": 0, "attempts": 0, "errors": []}
try:
    workers = [cluster.add_node(**node), cluster.add_node(**node, num_gpus=1)]  # a fake GPU on one (device: cpu)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    seen = {"rows": 0}

    def on_batch(batch):
        seen["rows"] += batch["rows"]
        if report["kills"] == 0 and seen["rows"] >= 4:
            cluster.remove_node(workers[0])  # mid-job: actors and blocks on that node are lost
            report["kills"] += 1

    for attempt in range(3):
        report["attempts"] += 1
        try:
            run_job(spec, progress=False, on_batch=on_batch)
            break
        except Exception as e:  # the job may fail with the node; the same command again must resume
            report["errors"].append(f"{type(e).__name__}: {str(e)[:200]}")
    report["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(report))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _spec(inputs: Path, out: Path, models: Path, executor: str = "ray") -> dict:
    return {
        "input": str(inputs),
        "output": str(out),
        "models_dir": str(models),
        "detect": {"queries": ["a car"], **EQUAL},
        "mask": {"min_area": 0},
        "inpaint": {"steps": 2, "seed": 7},
        "lineage": {"mode": "off"},
        "runtime": {"executor": executor, "device": "cpu", "batch_size": {"detect": 2, "segment": 2, "inpaint": 2}},
    }


def _exactly_once(out: Path, paths: list[Path]) -> dict:
    rows = raw_rows(out)  # every row of every part file, before the latest-row dedup
    got = [r["input_path"] for r in rows]
    want = sorted(str(p) for p in paths)
    return {"inputs": len(want), "rows": len(got), "lost": len(set(want) - set(got)),
            "duplicated": len(got) - len(set(got))}  # fmt: skip


def test_a_worker_node_removed_mid_job(tmp_path, tiny_models):
    inputs, out = tmp_path / "in", tmp_path / "out"
    paths = photos(inputs, 16, seed=81)
    tmp = short_tmp()
    try:
        res = subprocess.run([sys.executable, "-c", NODE_LOSS_SCRIPT, json.dumps(_spec(inputs, out, tiny_models))],
                             capture_output=True, text=True, timeout=600, env=sub_env(RAY_TMPDIR=tmp), cwd=ROOT)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    report = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    figures = {**report, **_exactly_once(out, paths)}
    record("Worker node removed mid-job (3-node Ray, fake GPU on one)",
           injected="cluster.remove_node of a worker after 4 rows reached the driver; re-run if the job failed",
           tried=report["attempts"], crashes=0, lost=figures["lost"], duplicated=figures["duplicated"],
           inputs=figures["inputs"], nodes=report["nodes"], kills=report["kills"],
           job_errors=len(report["errors"]), driver_peak_rss_mb=round(report["driver_peak_rss_mb"], 1))  # fmt: skip
    assert report["kills"] == 1 and report["attempts"] <= 2, figures
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert manifest.success_exists(str(out))


def test_the_driver_of_a_ray_job_killed_then_resumed(tmp_path, tiny_models):
    inputs, out = tmp_path / "in", tmp_path / "out"
    paths = photos(inputs, 12, seed=82)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(inputs, out, tiny_models)))
    tmp = short_tmp()
    env = sub_env(RAY_TMPDIR=tmp)
    cmd = [sys.executable, "-m", "promptpaint.cli", "run", str(spec), "--no-progress"]
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((out / "manifest").glob("*.parquet")):
            time.sleep(0.5)  # the first manifest part: rows are being written
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(timeout=60)
        stop_ray_under(tmp)  # what the killed driver's local Ray left behind (only that Ray)
        again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert again.returncode == 0, again.stderr[-3000:]
    figures = {**_exactly_once(out, paths), "kills": 1}
    record("Driver killed mid-job (CLI, Ray executor)",
           injected="SIGKILL to the CLI's process group (driver + its local Ray) once a manifest part existed, then "
           "the same command again", tried=1, crashes=0, lost=figures["lost"], duplicated=figures["duplicated"],
           inputs=figures["inputs"], manifest_rows=figures["rows"])  # fmt: skip
    table = manifest.read_manifest(str(out))
    assert sorted(table.column("input_path").to_pylist()) == sorted(str(p) for p in paths)
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
