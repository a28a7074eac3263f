"""Executable docs: every examples/*.yaml runs on the tiny models, as the README says it does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from promptpaint import manifest
from promptpaint.config import load_edit_spec
from promptpaint.jobs.bulk_edit import run_job
from promptpaint.samples import make_samples

# Edit specs (they name an ``input``); training and serve specs are covered in test_training.py / test_serve.py
EXAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")
    if "input" in (yaml.safe_load(p.read_text()) or {})
)


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"replace.yaml", "remove.yaml", "label.yaml", "multi.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_tiny_models(example: Path, tmp_path: Path, tiny_models: Path):
    make_samples(tmp_path / "in", 3, size=(96, 72), seed=11)
    spec = load_edit_spec(
        example,
        [
            f"models_dir={tiny_models}",
            f"input={tmp_path / 'in'}",
            f"output={tmp_path / 'out'}",
            "inpaint.steps=2",
            "detect.threshold=0.45",  # the tiny detector's scores sit around 0.5-0.59: every image gets boxes
            "runtime.executor=local",
            "lineage.mode=off",
        ],
    )
    result = run_job(spec, progress=False)
    done = {"detect": "detected", "segment": "segmented"}.get(spec.mode, "edited")
    assert result.counts.get(done, 0) == 3, result.counts
    if spec.mode in ("detect", "segment"):
        assert (tmp_path / "out" / "coco.json").is_file()
    assert len(manifest.read_manifest(str(tmp_path / "out"))) == 3
