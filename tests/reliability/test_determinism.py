"""The same spec twice on CPU: byte-identical images and masks, identical manifests (minus timings).

Run on Ray with two actors of one CPU each, so batches land on different workers in different orders
between the runs; each image's seed derives from its id, so that must not matter. The second run goes
to the same output path (the first run's folder is moved away), so even output paths must agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_kit import (
    assert_exactly_once,
    audit,
    make_spec,
    manifest_by_id,
    map_workers,
    output_files,
    record,
    row_differences,
    small_corpus,
)

from promptpaint.jobs.bulk_edit import run_job

SUMMARY_TIMINGS = ("seconds", "images_per_second", "stage_ms_per_image")


def summary(output: Path) -> dict:
    data = json.loads((output / "_SUCCESS").read_text())
    return {k: v for k, v in data.items() if k not in SUMMARY_TIMINGS}


@pytest.mark.reliability
@pytest.mark.heavy
def test_same_spec_twice_gives_identical_bytes_and_manifests(tmp_path, tiny_models, ray_session):
    inputs = small_corpus(tmp_path / "in", 14, size=(96, 72), seed=21)
    out = tmp_path / "out"
    spec = make_spec(str(tmp_path / "in"), str(out), tiny_models, executor="ray", pool_size={"inpaint": 2})

    workers: set[int] = set()
    run_job(spec, progress=False, on_batch=lambda b: workers.update(map_workers()))
    first = tmp_path / "first"
    shutil.move(out, first)
    run_job(spec, progress=False, on_batch=lambda b: workers.update(map_workers()))

    files_a, files_b = output_files(str(first)), output_files(str(out))
    rows_a = {k: {**r, "output_path": r["output_path"].replace(str(first), str(out)),
                  "mask_path": r["mask_path"].replace(str(first), str(out))}
              for k, r in manifest_by_id(str(first)).items()}  # fmt: skip
    rows_b = manifest_by_id(str(out))
    differing_files = sorted(k for k in files_a.keys() | files_b.keys() if files_a.get(k) != files_b.get(k))
    differing_columns = row_differences(rows_a, rows_b)
    a = audit(str(out), inputs)
    record(
        "Determinism (Ray, 2 actors)",
        injected="the same spec run twice (batches on different workers/orders)",
        tried=2,
        crashes=0,
        lost=a.lost,
        duplicated=a.duplicated,
        output_files=len(files_b),
        actor_processes=len(workers),
        differing_files=len(differing_files),
        differing_manifest_columns=differing_columns,
    )
    assert len(workers) >= 2, "the runs did not spread over two actors"
    assert_exactly_once(a)
    assert files_a and not differing_files, differing_files[:5]
    assert differing_columns == {}
    assert summary(first) == summary(out)
