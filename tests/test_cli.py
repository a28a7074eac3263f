"""The CLI as a user runs it: subprocesses, exit codes, summaries, files on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promptpaint import manifest
from promptpaint.samples import make_samples

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "promptpaint.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny set built through the CLI itself."""
    folder = tmp_path_factory.mktemp("cli-models")
    res = cli("models", "build-tiny", str(folder))
    assert res.returncode == 0, res.stderr
    for name in ("owlv2", "sam", "sd15-inpaint"):
        assert f"built {folder / name}" in res.stdout
    return folder


@pytest.fixture()
def spec_file(tmp_path: Path, cli_models: Path) -> Path:
    make_samples(tmp_path / "in", 4, size=(64, 48), seed=9, broken=True)
    spec = {
        "input": "in",  # relative to the spec file's folder
        "output": "out",
        "models_dir": str(cli_models),
        "detect": {"queries": ["a car"], "threshold": 0.55},
        "inpaint": {"steps": 2},
        "runtime": {"executor": "local"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.heavy
def test_run_writes_outputs_and_summary(spec_file: Path):
    res = cli("run", str(spec_file), "--set", "inpaint.prompt=a red vintage bicycle", "--no-progress")
    assert res.returncode == 0, res.stderr
    out = spec_file.parent / "out"
    assert "edited" in res.stdout and "images/s" in res.stdout
    assert "error truncated" in res.stdout and "error empty" in res.stdout and "error undecodable" in res.stdout
    rows = manifest.read_manifest(str(out)).to_pylist()
    assert len(rows) == 7
    assert {r["spec.inpaint.prompt"] for r in rows} == {"a red vintage bicycle"}
    edited = [r for r in rows if r["status"] == "edited"]
    assert len(list((out / "images").iterdir())) == len(edited) > 0
    assert (out / "_SUCCESS").exists()

    again = cli("run", str(spec_file), "--set", "inpaint.prompt=a red vintage bicycle", "--no-progress")
    assert again.returncode == 0
    assert len(manifest.read_manifest(str(out))) == 7  # nothing added: all 7 ids were skipped


@pytest.mark.heavy
def test_run_on_local_ray_started_for_the_user(spec_file: Path):
    res = cli("run", str(spec_file), "--set", "runtime.executor=ray", "--set", "output=ray-out", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    # --set paths are relative to the working directory (the repo root here).
    out = ROOT / "ray-out"
    try:
        assert len(manifest.read_manifest(str(out))) == 7
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("inpaint.promt=x", "inpaint.promt: unknown key"),
        ("mask.instances=biggest", "mask.instances: must be one of"),
        ("inpaint.steps=-3", "inpaint.steps"),
        ("runtime.batch_size={foo: 2}", "unknown stage"),
        ("nokey", "--set expects key.path=value"),
        ("segment.model=owlv2", "segment.model='owlv2' is a detect model"),
        ("detect.model=nope", "detect.model: unknown model 'nope'"),
    ],
)
def test_invalid_spec_exits_2_and_names_the_field(spec_file: Path, override: str, needle: str):
    res = cli("run", str(spec_file), "--set", override)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr
    dry = cli("run", str(spec_file), "--set", override, "--dry-run")  # the plan checks the same things
    assert dry.returncode == 2 and needle in dry.stderr, (dry.stdout, dry.stderr)


def test_qc_model_of_the_wrong_task_names_the_qc_key(spec_file: Path):
    res = cli("run", str(spec_file), "--set", "qc.enabled=true", "--set", "qc.model=sam")
    assert res.returncode == 2 and "qc.model='sam' is a segment model" in res.stderr, res.stderr


def test_missing_spec_and_missing_input_exit_2(tmp_path: Path, spec_file: Path):
    res = cli("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = cli("run", str(spec_file), "--set", f"input={tmp_path}/nothing-here/*.jpg")
    assert res.returncode == 2 and "nothing-here" in res.stderr


def test_missing_model_exits_1_with_the_fix(spec_file: Path, tmp_path: Path):
    res = cli("run", str(spec_file), "--set", f"models_dir={tmp_path}/empty")
    assert res.returncode == 1
    assert "build-tiny" in res.stderr and "google/owlv2-base-patch16-ensemble" in res.stderr


def test_dry_run_lists_inputs_and_stages_and_runs_nothing(spec_file: Path):
    res = cli("run", str(spec_file), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "inputs: 7 files" in res.stdout
    assert "actors read+detect+segment+mask+inpaint+write: pool 1," in res.stdout  # one 2-CPU node here
    assert "model calls" in res.stdout
    assert not (spec_file.parent / "out").exists()


def test_models_list_shows_hub_ids_and_availability(cli_models: Path):
    res = cli("models", "list", "--models-dir", str(cli_models))
    assert res.returncode == 0
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "stabilityai" in lines["sd15-inpaint"] or "stable-diffusion" in lines["sd15-inpaint"]
    assert " yes " in lines["owlv2"] and " yes " in lines["sam"]
    res = cli("models", "list", "--models-dir", "/nonexistent")
    assert " no " in res.stdout
