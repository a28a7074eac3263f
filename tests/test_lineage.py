"""Lineage to Comet: the offline archive's contents, require/fallback against a closed port, sampling."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from promptpaint import manifest
from promptpaint.config import EditSpec, build_spec
from promptpaint.io import read_png_text
from promptpaint.jobs.bulk_edit import run_job
from promptpaint.lineage import Fingerprint, Sampler
from promptpaint.samples import make_samples

ROOT = Path(__file__).resolve().parents[1]


def read_archive(output: Path) -> tuple[list[dict], dict]:
    (archive,) = glob.glob(str(output / "comet" / "*.zip"))
    with zipfile.ZipFile(archive) as z:
        msgs = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
        meta = json.loads(z.read("experiment.json"))
    return msgs, meta


def spec_for(inputs: Path, output: Path, models: Path, **lineage: object) -> EditSpec:
    return build_spec(
        EditSpec,
        {
            "input": str(inputs),
            "output": str(output),
            "models_dir": str(models),
            "detect": {"queries": ["a car"], "threshold": 0.55, "top_k": 3},
            "inpaint": {"steps": 2, "prompt": "a red vintage bicycle"},
            "runtime": {"executor": "local"},
            "lineage": {"mode": "offline", "sample_images": 4, **lineage},
        },
    )


def test_offline_archive_holds_params_samples_annotations_assets_metrics(tmp_path, tiny_models):
    make_samples(tmp_path / "in", 6, size=(96, 72), seed=4, broken=True)
    out = tmp_path / "out"
    result = run_job(spec_for(tmp_path / "in", out, tiny_models), progress=False)
    assert result.counts["edited"] >= 4

    msgs, meta = read_archive(out)
    key = result.summary["lineage"]["experiment_key"]
    assert meta["offline_id"] == key and "mode:edit" in meta["tags"]

    # Comet writes scalar parameters under "param" and list-valued ones under "params".
    params = {}
    for m in msgs:
        if m["type"] == "parameter_msg":
            p = m["payload"].get("param") or m["payload"]["params"]
            params[p["paramName"]] = p["paramValue"]
    assert params["inpaint.prompt"] == "a red vintage bicycle"
    assert params["detect.threshold"] == 0.55 and params["mask.dilate_px"] == 8

    others = {m["payload"]["key"]: m["payload"]["value"] for m in msgs if m["type"] == "log_other"}
    assert others["model.inpaint.source"] == str(tiny_models / "sd15-inpaint")
    assert others["promptpaint.spec_hash"] == result.summary["spec_hash"]
    assert others["version.torch"].startswith("2.")
    assert len(others["promptpaint.dataset_fingerprint"]) == 64 and others["promptpaint.inputs"] == 9

    uploads = [m["payload"] for m in msgs if m["type"] == "file_upload"]
    images = [u for u in uploads if u["upload_type"] == "visualization"]
    kinds = Counter(u["additional_params"]["figName"].split("/")[0] for u in images)
    assert kinds == {"input": 4, "mask_overlay": 4, "before_after": 4}  # sample_images=4, all edited

    # The sample is the 4 smallest ids among edited rows, and its boxes are the manifest's boxes.
    rows = {r["id"]: r for r in manifest.read_manifest(str(out)).to_pylist()}
    edited_ids = sorted(i for i, r in rows.items() if r["status"] == "edited")
    inputs = [u for u in images if u["additional_params"]["figName"].startswith("input/")]
    sampled = sorted(u["metadata"]["id"] for u in inputs)
    assert sampled == edited_ids[:4]
    for u in inputs:
        row = rows[u["metadata"]["id"]]
        (ann,) = u["metadata"]["annotations"]
        assert [d["label"] for d in ann["data"]] == row["labels"]
        assert [d["boxes"][0][0] for d in ann["data"]] == pytest.approx([b[0] for b in row["boxes"]])

    assets = {u["additional_params"]["fileName"] for u in uploads if u["upload_type"] == "asset"}
    assert assets == {"spec.yaml", "manifest.parquet"}

    metrics = {}
    for m in msgs:
        if m["type"] == "metric_msg":
            metrics[m["payload"]["metric"]["metricName"]] = m["payload"]["metric"]["metricValue"]
    assert metrics["count.edited"] == result.counts["edited"]
    assert metrics["error.truncated"] == 1 and metrics["error.empty"] == 1

    # The key reaches every manifest row and every output PNG.
    assert {r["experiment_key"] for r in rows.values()} == {key}
    assert {r["lineage_mode"] for r in rows.values()} == {"offline"}
    edited = rows[edited_ids[0]]
    text = read_png_text(Path(edited["output_path"]).read_bytes())
    assert text["promptpaint:experiment_key"] == key
    assert text["promptpaint:spec_hash"] == edited["spec_hash"]


def test_comet_call_failing_midway_degrades_to_manifest_only(tmp_path, tiny_models):
    """A sampled input vanishes before the end-of-job sampling: logging fails, the job does not."""
    paths = make_samples(tmp_path / "in", 3, size=(96, 72), seed=8)
    out = tmp_path / "out"

    def remove_inputs(_batch: dict) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    result = run_job(spec_for(tmp_path / "in", out, tiny_models), progress=False, on_batch=remove_inputs)
    lineage = result.summary["lineage"]
    assert lineage["degraded"] and "FileNotFoundError" in lineage["degraded"]
    assert manifest.success_exists(str(out)) and len(manifest.read_manifest(str(out))) == 3
    assert glob.glob(str(out / "comet" / "*.zip"))  # the archive still holds what was logged


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def run_cli(spec_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COMET_API_KEY": "0123456789abcdef0123456789abcdef",
        "COMET_URL_OVERRIDE": f"http://127.0.0.1:{closed_port()}/clientlib/",
    }
    return subprocess.run(
        [sys.executable, "-m", "promptpaint.cli", "run", str(spec_path), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture()
def online_spec(tmp_path: Path, tiny_models: Path) -> Path:
    make_samples(tmp_path / "in", 3, size=(64, 48), seed=6)
    spec = spec_for(tmp_path / "in", tmp_path / "out", tiny_models, mode="online")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return path


@pytest.mark.heavy
def test_require_with_unreachable_comet_fails_before_model_work(online_spec: Path):
    t0 = time.perf_counter()
    res = run_cli(online_spec, "--set", "lineage.require=true")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "lineage.require is set and Comet is unreachable" in res.stderr
    assert time.perf_counter() - t0 < 60
    out = online_spec.parent / "out"
    assert not (out / "images").exists() and not (out / "manifest").exists()


@pytest.mark.heavy
def test_default_with_unreachable_comet_finishes_with_offline_lineage(online_spec: Path):
    res = run_cli(online_spec)
    assert res.returncode == 0, res.stdout + res.stderr
    out = online_spec.parent / "out"
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 3 and manifest.success_exists(str(out))
    assert {r["lineage_mode"] for r in rows} == {"offline"}
    assert rows[0]["experiment_key"] and glob.glob(str(out / "comet" / "*.zip"))


def test_sampler_is_deterministic_and_bounded():
    ids = [f"{i * 7919 % 1000:064x}" for i in range(1000)]
    rows = [{"id": i, "input_path": i, "status": "edited"} for i in ids]
    a, b = Sampler(5), Sampler(5)
    for r in rows:
        a.offer(r)
    for r in reversed(rows):
        b.offer(r)
    assert [r["id"] for r in a.rows()] == [r["id"] for r in b.rows()] == sorted(ids)[:5]
    a.offer({"id": "0" * 64, "input_path": "x", "status": "error"})  # errors are never sampled
    assert len(a.rows()) == 5 and a.rows()[0]["id"] == sorted(ids)[0]


def test_fingerprint_is_order_independent():
    f, g = Fingerprint(), Fingerprint()
    for i in ("ab" * 32, "cd" * 32, "ef" * 32):
        f.add(i)
    for i in ("ef" * 32, "ab" * 32, "cd" * 32):
        g.add(i)
    assert f.hexdigest() == g.hexdigest() and f.count == 3
    g.add("01" * 32)
    assert f.hexdigest() != g.hexdigest()


def test_segment_mode_lineage_logs_inputs_and_mask_overlays(tmp_path, tiny_models):
    make_samples(tmp_path / "in", 3, size=(96, 72), seed=2)
    out = tmp_path / "out"
    spec = spec_for(tmp_path / "in", out, tiny_models, mode="offline", sample_images=2)
    spec = spec.model_copy(update={"mode": "segment"})
    result = run_job(spec, progress=False)
    assert result.counts["segmented"] == 3
    msgs, meta = read_archive(out)
    assert "mode:segment" in meta["tags"]
    uploads = [m["payload"] for m in msgs if m["type"] == "file_upload"]
    kinds = Counter(
        u["additional_params"]["figName"].split("/")[0] for u in uploads if u["upload_type"] == "visualization"
    )
    assert kinds == {"input": 2, "mask_overlay": 2}  # no before/after: nothing is repainted
    assets = {u["additional_params"].get("fileName") for u in uploads}
    assert any(a and "manifest" in a for a in assets)
