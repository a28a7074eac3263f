"""Object storage for real: inputs, outputs, resume, the run lock and `--incremental` on s3:// against a local
S3-compatible server (moto on 127.0.0.1), through s3fs as users configure it (AWS_ENDPOINT_URL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import moto_s3

from promptpaint import manifest
from promptpaint.config import EditSpec, build_spec
from promptpaint.jobs.bulk_edit import run_job
from promptpaint.jobs.lock import RunLock, RunLocked
from promptpaint.samples import make_samples

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (the environment a user sets for an S3-compatible endpoint) with a bucket."""
    import fsspec

    with moto_s3():
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("pp-test")
        yield fs


def _upload(fs, local: Path, prefix: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{prefix}/{p.relative_to(local).as_posix()}")


def test_a_job_on_s3_resumes_and_locks(s3, tmp_path, tiny_models):
    make_samples(tmp_path / "day1", 4, size=(64, 48), seed=21)
    _upload(s3, tmp_path / "day1", "pp-test/in/day1")
    spec = build_spec(EditSpec, {"input": "s3://pp-test/in", "output": "s3://pp-test/out", "mode": "detect",
                                 "models_dir": str(tiny_models), "detect": {"queries": ["car"], "threshold": 0.45},
                                 "runtime": {"executor": "local"}, "lineage": {"mode": "off"}})  # fmt: skip
    first = run_job(spec, progress=False)
    assert first.counts.get("detected") == 4
    assert manifest.success_exists("s3://pp-test/out")
    make_samples(tmp_path / "day2", 3, size=(64, 48), seed=22)
    _upload(s3, tmp_path / "day2", "pp-test/in/day2")
    second = run_job(spec, progress=False, incremental=True)
    assert second.counts.get("detected") == 3 and second.counts.get("skipped") == 4
    table = manifest.read_manifest("s3://pp-test/out")
    paths = table.column("input_path").to_pylist()
    assert len(paths) == 7 == len(set(paths)) and all(p.startswith("s3://pp-test/in/") for p in paths)
    again = run_job(spec, progress=False, incremental=True)
    assert again.summary.get("nothing_new") and again.counts == {"skipped": 7}
    assert s3.exists("pp-test/out/coco.json")
    held = RunLock("s3://pp-test/out").acquire()
    try:
        assert s3.exists("pp-test/out/_RUN_LOCK")
        with pytest.raises(RunLocked):
            RunLock("s3://pp-test/out").acquire()
    finally:
        held.release()
    assert not s3.exists("pp-test/out/_RUN_LOCK")
