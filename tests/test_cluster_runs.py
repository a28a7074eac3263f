"""Scheduled runs on a cluster (issue 13): incremental runs over a growing folder, the run lock, the "nothing new"
fast path, `promptpaint submit` against a real local Ray head, and the RayJobs' own entrypoints and specs
(cluster/k8s/base: bulk edit and train) run on that head against a local S3 server, so the manifests cannot drift
from the CLI."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import free_port, moto_s3

from promptpaint import manifest
from promptpaint.jobs.lock import LOCK_NAME, RunLock, RunLocked
from promptpaint.samples import make_samples
from tests.test_cluster_manifests import _base_objects, _one, rayjob_spec_file
from tests.test_hardening import stop_ray_under

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "promptpaint.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})  # fmt: skip


def _spec_file(tmp: Path, models: Path, inputs: Path, out: Path) -> Path:
    spec = {"input": str(inputs), "output": str(out), "models_dir": str(models), "mode": "detect",
            "detect": {"queries": ["car"], "threshold": 0.45}, "runtime": {"executor": "local"},
            "lineage": {"mode": "offline"}}  # fmt: skip
    path = tmp / "spec.yaml"
    path.write_text(json.dumps(spec))
    return path


# ---------------------------------------------------------------------------------------------------- lock


def test_lock_excludes_a_second_run_and_is_released(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLocked, match="another run holds"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(str(tmp_path)).acquire():
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_expired_lock_is_taken_over(tmp_path):
    dead = RunLock(str(tmp_path), lease_s=0.2, heartbeat_s=3600).acquire()
    dead._stop.set()  # its owner died: nobody renews or removes it
    time.sleep(0.3)
    taker = RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == taker.token
    taker.release()


def test_a_lock_whose_owner_died_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"token": "x", "owner": f"{socket.gethostname()}:{dead.stdout.strip()}", "expires": time.time() + 3600}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))  # a killed run's lock, its lease far from over
    with RunLock(str(tmp_path)).acquire() as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    record["owner"] = f"elsewhere:{dead.stdout.strip()}"  # another host's owner: only its lease counts
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunLocked):
        RunLock(str(tmp_path)).acquire()


def test_a_held_lock_is_renewed_and_waited_for(tmp_path):
    held = RunLock(str(tmp_path), lease_s=0.6, heartbeat_s=0.1).acquire()
    time.sleep(1.0)  # longer than the lease: the heartbeat keeps it alive
    with pytest.raises(RunLocked):
        RunLock(str(tmp_path)).acquire()
    threading.Timer(0.5, held.release).start()
    t0 = time.monotonic()
    waiter = RunLock(str(tmp_path)).acquire(wait=True, poll_s=0.1, timeout_s=10)
    assert 0.3 < time.monotonic() - t0 < 10
    waiter.release()


# ---------------------------------------------------------------------------------------------- incremental


@pytest.mark.heavy
def test_incremental_processes_only_new_inputs_and_nothing_new_is_fast(tmp_path, tiny_models):
    inputs, out = tmp_path / "in", tmp_path / "out"
    make_samples(inputs / "day1", 10, size=(64, 48), seed=1)
    spec = _spec_file(tmp_path, tiny_models, inputs, out)
    first = _cli("run", str(spec), "--incremental", "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    make_samples(inputs / "day2", 5, size=(64, 48), seed=2)
    second = _cli("run", str(spec), "--incremental", "--no-progress")
    assert second.returncode == 0, second.stderr[-2000:]
    assert re.search(r"processed\s+5\n", second.stdout) and re.search(r"skipped\s+10\n", second.stdout), second.stdout
    table = manifest.read_manifest(str(out))
    paths = table.column("input_path").to_pylist()
    assert len(paths) == 15 and len(set(paths)) == 15  # every input exactly once
    experiments = len(list((out / "comet").glob("*.zip")))
    t0 = time.monotonic()
    third = _cli("run", str(spec), "--incremental", "--no-progress")
    took = time.monotonic() - t0
    assert third.returncode == 0 and "0 new inputs (15 already done" in third.stdout, third.stdout + third.stderr
    assert len(list((out / "comet").glob("*.zip"))) == experiments  # no new Comet experiment
    assert len(manifest.read_manifest(str(out))) == 15
    assert took < 30, took  # no Ray, no model loads (the CLI's own import time dominates)


@pytest.mark.heavy
def test_a_second_run_on_a_locked_output_exits_without_processing(tmp_path, tiny_models):
    inputs, out = tmp_path / "in", tmp_path / "out"
    make_samples(inputs, 3, size=(64, 48), seed=3)
    spec = _spec_file(tmp_path, tiny_models, inputs, out)
    with RunLock(str(out)).acquire():  # a live run (another process, as far as the CLI can tell)
        res = _cli("run", str(spec), "--no-progress")
    assert res.returncode == 1 and "another run holds" in res.stderr, res.stderr[-2000:]
    assert manifest.read_manifest(str(out)) is None  # nothing processed
    res = _cli("run", str(spec), "--no-progress")  # lock released: runs
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------- submit


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on 127.0.0.1 with its job API, in a private temp dir; stopped after the test."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    tmp = Path(f"/tmp/pp-head-{os.getpid()}")  # short: Ray's socket paths have a length limit
    # Ray's token authentication on, as on a real cluster: the head and every client (submit) carry the token
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # the venv, as when activated  # fmt: skip
    port, dash = free_port(), free_port()
    # Every port of its own: the defaults (dashboard agent 52365, runtime-env agent, metrics) are taken by the
    # test session's Ray, and a head without its agent answers every submit with "No available agent".
    agent, grpc, renv, metrics = (free_port() for _ in range(4))
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
           f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
           f"--temp-dir={tmp}", "--disable-usage-stats"]  # fmt: skip
    started = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_ray_under(str(tmp))  # only this head's processes, never every Ray on the machine
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.heavy
def test_submit_runs_once_per_slot_and_wait_gives_the_exit_code(tmp_path, tiny_models, ray_head):
    address, env = ray_head
    inputs, out = tmp_path / "in", tmp_path / "out"
    make_samples(inputs, 3, size=(64, 48), seed=4)
    spec = _spec_file(tmp_path, tiny_models, inputs, out)
    first = _cli("submit", str(spec), "--address", address, "--slot", "t1", "--wait", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.startswith("submitted: promptpaint-run-")
    assert len(manifest.read_manifest(str(out))) == 3
    again = _cli("submit", str(spec), "--address", address, "--slot", "t1", env=env)
    assert again.returncode == 0 and again.stdout.startswith("already submitted:") and "SUCCEEDED" in again.stdout
    assert first.stdout.split()[1] == again.stdout.split()[2]  # one id, one job
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace('"detect"', '"detekt"', 1))
    failed = _cli("submit", str(bad), "--address", address, "--slot", "t1", "--wait", env=env)
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]  # the job's own exit code


# ---------------------------------------------------------------------------------------------------- the RayJobs

# Submits one entrypoint string as it is (KubeRay's HTTPMode does the same: POST /api/jobs/ with spec.entrypoint),
# waits for the end within a limit, prints {"status", "logs"}. A subprocess: Ray's auth token is read once per process.
_RAYJOB = """
import json, sys, time
from ray.job_submission import JobSubmissionClient

address, entrypoint, env, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
client = JobSubmissionClient(address)
for attempt in range(30):  # a head that just started has no job agent yet
    try:
        sid = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
        break
    except RuntimeError as e:
        if "No available agent" not in str(e) or attempt == 29:
            raise
        time.sleep(2)
deadline = time.monotonic() + timeout
while (status := str(client.get_job_status(sid).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    if time.monotonic() > deadline:
        client.stop_job(sid)
        status = "TIMED OUT"
        break
    time.sleep(1)
print(json.dumps({"status": status, "logs": client.get_job_logs(sid)}))
"""


def _run_rayjob(head: tuple[str, dict], entrypoint: str, env: dict[str, str], timeout: float) -> dict:
    address, head_env = head
    res = subprocess.run([sys.executable, "-c", _RAYJOB, address, entrypoint, json.dumps(env), str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 120, cwd=ROOT, env=head_env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def s3_server():
    """A moto S3 server on 127.0.0.1 and the environment that reaches it (for the job's runtime env too)."""
    with moto_s3() as env:
        yield env


def _rayjob_here(name: str, tmp: Path) -> str:
    """The entrypoint of RayJob `name` of cluster/k8s/base, its spec file (from the ConfigMap) written under `tmp`:
    exactly as in the manifest but for the ConfigMap's mount path, which becomes `tmp`."""
    objects = _base_objects()
    job = _one(objects, "RayJob", name)
    mount, file_name, text = rayjob_spec_file(objects, job)
    (tmp / file_name).write_text(text)
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.count(f"{mount}/") == 1, entrypoint
    return entrypoint.replace(f"{mount}/", f"{tmp}/")


@pytest.mark.heavy
def test_the_bulk_edit_rayjob_runs_on_a_ray_head(tmp_path, tiny_models, ray_head, s3_server):
    """cluster/k8s/base/rayjob-bulk-edit.yaml's entrypoint on its ConfigMap's spec (edit mode, executor ray,
    s3:// in and out), submitted as KubeRay submits it to a token-auth head; only the mount path and the models
    differ (tiny models here; the hub on a cluster)."""
    import fsspec

    from promptpaint.config import load_edit_spec

    specs = tmp_path / "specs"
    specs.mkdir()
    entrypoint = _rayjob_here("promptpaint-bulk-edit", specs)
    entrypoint += f" --set models_dir={shlex.quote(str(tiny_models))}"
    (spec_file,) = specs.iterdir()
    spec = load_edit_spec(spec_file)
    assert spec.input.startswith("s3://") and spec.output.startswith("s3://")
    fs = fsspec.filesystem("s3")
    fs.mkdir(urlparse(spec.input).netloc)  # the bucket
    inputs = make_samples(tmp_path / "in", 3, size=(64, 48), seed=5)
    for p in inputs:
        fs.put_file(str(p), f"{spec.input.rstrip('/')}/{p.name}")
    job = _run_rayjob(ray_head, entrypoint, s3_server, timeout=480)
    assert job["status"] == "SUCCEEDED", job["logs"][-12000:]
    table = manifest.read_manifest(spec.output)
    assert table is not None, job["logs"][-12000:]
    paths = table.column("input_path").to_pylist()
    assert sorted(paths) == sorted(f"{spec.input.rstrip('/')}/{p.name}" for p in inputs), paths  # one row each
    statuses = table.column("status").to_pylist()
    assert set(statuses) <= {"edited", "no_detection"}, statuses
    assert manifest.success_exists(spec.output)


@pytest.mark.heavy
def test_the_train_rayjob_runs_on_a_ray_head(tmp_path, tiny_models, ray_head, s3_server):
    """cluster/k8s/base/rayjob-train.yaml's entrypoint on its ConfigMap's spec (s3:// subject photos, output and
    Ray Train storage), on a token-auth head: tiny models, a few steps instead of 400 and a learning rate that moves
    tiny random weights enough for the "the LoRA changes nothing" check."""
    import fsspec

    from promptpaint.config import load_train_spec
    from promptpaint.samples import make_photos

    specs = tmp_path / "specs"
    specs.mkdir()
    entrypoint = _rayjob_here("promptpaint-train", specs)
    small = [f"models_dir={tiny_models}", "train.max_steps=2", "train.checkpoint_every=1", "train.num_class_images=2",
             "train.class_steps=2", "train.validation_steps=2", "train.learning_rate=0.01"]  # fmt: skip
    entrypoint += "".join(f" --set {shlex.quote(s)}" for s in small)
    (spec_file,) = specs.iterdir()
    spec = load_train_spec(spec_file)
    uris = (spec.output, spec.train.instance_data, spec.train.storage_path)
    assert all(u.startswith("s3://") for u in uris), uris
    fs = fsspec.filesystem("s3")
    fs.mkdir(urlparse(spec.output).netloc)
    for p in make_photos(tmp_path / "dog", 3, (0.02, 0.06), seed=5):
        fs.put_file(str(p), f"{spec.train.instance_data.rstrip('/')}/{Path(p).name}")
    job = _run_rayjob(ray_head, entrypoint, s3_server, timeout=480)
    assert job["status"] == "SUCCEEDED", job["logs"][-12000:]
    assert fs.exists(f"{spec.output.rstrip('/')}/pytorch_lora_weights.safetensors"), fs.find(spec.output)
    assert fs.find(spec.train.storage_path), "Ray Train's checkpoints go to train.storage_path"
