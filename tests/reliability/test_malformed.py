"""The malformed-input battery: 1 025 seeded files (see malformed_corpus.py) through the decoder and
through the whole job. Every file must end as a correct decode or a typed error row; nothing crashes;
bombs are rejected from their headers, so the job's peak RSS stays near that of a clean run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from malformed_corpus import Case, build_corpus
from reliability_kit import ROOT, assert_exactly_once, audit, cli_env, record, spec_dict, write_spec_file

from promptpaint import manifest
from promptpaint.actors.writer import utf8_safe
from promptpaint.config import LimitsSpec
from promptpaint.io import DecodeError, decode_image

LIMITS = LimitsSpec()  # the defaults a user gets: 40 Mpx, 200 MB, the seven formats
MIB = 2**20
# Peak RSS bounds for the CLI process (local executor, tiny models, CPU torch, 2 cores). Measured over
# several runs: a clean 8-image run peaks at 0.95-1.2 GiB (torch + three models), the battery 0-140 MiB
# above it (400 images of many sizes through the models). A decoded bomb would blow through both: the
# 8000x8000 PNG alone is 64 MiB as L and 192 MiB as RGB before any model sees its 64 Mpx.
RSS_OVER_CLEAN_RUN = 384 * MIB
RSS_ABSOLUTE = 2048 * MIB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    folder = tmp_path_factory.mktemp("malformed") / "corpus"
    return folder, build_corpus(folder, seed=20240611)


def read(case: Case) -> bytes:
    with open(os.fsencode(case.path), "rb") as f:
        return f.read()


def outcome(case: Case, data: bytes) -> tuple[str, str, tuple[int, int] | None, float]:
    """('ok', format, (w, h), seconds) or ('error', kind, None, seconds); 'crash' for anything else."""
    t0 = time.perf_counter()
    try:
        d = decode_image(data, max_pixels=LIMITS.max_pixels, formats=LIMITS.formats, max_bytes=LIMITS.max_bytes)
    except DecodeError as e:
        return "error", e.kind, None, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - the thing this battery counts
        return "crash", f"{type(e).__name__}: {e}", None, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    h, w = d.rgb.shape[:2]
    problems = []
    if case.alpha is not None and (d.alpha is not None) != case.alpha:
        problems.append("alpha")
    if case.rgb_sha256 and hashlib.sha256(np.ascontiguousarray(d.rgb).tobytes()).hexdigest() != case.rgb_sha256:
        problems.append("pixels")
    return ("ok" if not problems else "wrong"), ",".join(problems) or d.format, (w, h), seconds


def matches(case: Case, status: str, detail: str, size: tuple[int, int] | None) -> bool:
    if status == "ok":
        return case.expect in ("ok", "ok_or_error") and (case.size is None or size == tuple(case.size))
    if status == "error":
        return case.expect in ("error", "ok_or_error") and detail in case.kinds
    return False


@pytest.mark.reliability
def test_every_file_decodes_correctly_or_raises_a_typed_error(corpus):
    _, cases = corpus
    assert len(cases) >= 1000
    results = {c.path: outcome(c, read(c)) for c in cases}
    wrong = {c.path: (c.category, c.expect, results[c.path][:3]) for c in cases if not matches(c, *results[c.path][:3])}
    crashes = [r for r in results.values() if r[0] == "crash"]
    cut = [results[c.path] for c in cases if c.category == "truncated"]
    bombs = [results[c.path][3] for c in cases if "bomb" in c.category or "huge" in c.category]
    record(
        "Malformed inputs: decoder",
        injected="1 025 seeded files: truncated, random, empty, bombs, lying headers, odd modes/containers/EXIF/names",
        tried=len(cases),
        crashes=len(crashes),
        lost=0,
        duplicated=0,
        wrong_outcomes=len(wrong),
        decoded=sum(r[0] == "ok" for r in results.values()),
        typed_errors=dict(Counter(r[1] for r in results.values() if r[0] == "error")),
        truncations_labelled_truncated=f"{sum(r[1] == 'truncated' for r in cut)}/{len(cut)}",
        slowest_bomb_rejection_ms=round(max(bombs) * 1000, 1),
        slowest_decode_ms=round(max(r[3] for r in results.values()) * 1000, 1),
    )
    assert not crashes, crashes[:5]
    assert not wrong, dict(list(wrong.items())[:10])
    assert max(bombs) < 0.5, "a bomb was decoded rather than rejected from its header"


def run_cli_measuring_rss(spec_file: Path, rss_file: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter that reports its own peak RSS (ru_maxrss) when it exits."""
    wrapper = (
        "import resource, sys\n"
        "out = sys.argv.pop(1)\n"
        "try:\n"
        "    from promptpaint.cli import main\n"
        "    sys.argv[0] = 'promptpaint'\n"
        "    main()\n"
        "finally:\n"
        "    open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", wrapper, str(rss_file), "run", str(spec_file), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
        cwd=ROOT,
    )


@pytest.mark.reliability
@pytest.mark.heavy
def test_job_over_the_battery_types_every_row_and_stays_in_memory(corpus, tmp_path, tiny_models):
    folder, cases = corpus
    # Baseline: the same CLI and models on 8 clean images of the corpus.
    clean = tmp_path / "clean"
    clean.mkdir()
    for c in [c for c in cases if c.category == "jpeg"][:8]:
        (clean / Path(c.path).name).write_bytes(read(c))
    clean_spec = write_spec_file(
        tmp_path / "clean.yaml", spec_dict(str(clean), str(tmp_path / "clean-out"), tiny_models, executor="local")
    )
    base = run_cli_measuring_rss(clean_spec, tmp_path / "clean.rss")
    assert base.returncode == 0, base.stderr[-3000:]
    base_rss = int((tmp_path / "clean.rss").read_text())

    out = tmp_path / "out"
    spec_file = write_spec_file(tmp_path / "spec.yaml", spec_dict(str(folder), str(out), tiny_models, executor="local"))
    t0 = time.perf_counter()
    res = run_cli_measuring_rss(spec_file, tmp_path / "job.rss")
    seconds = time.perf_counter() - t0
    job_rss = int((tmp_path / "job.rss").read_text()) if (tmp_path / "job.rss").exists() else -1

    paths = [c.path for c in cases]
    a = audit(str(out), paths)
    rows = {r["input_path"]: r for r in (manifest.read_manifest(str(out)).to_pylist() if a.rows else [])}
    expected = {utf8_safe(c.path): (c, outcome(c, read(c))) for c in cases}
    disagree = []
    for path, (case, (status, detail, size, _)) in expected.items():
        row = rows.get(path)
        if row is None:
            continue  # counted as lost
        if status == "error":
            ok = row["status"] == "error" and row["error_stage"] == "read" and row["error_kind"] == detail
        else:  # decoded: the models ran (or found nothing); the row carries the decoded size
            ok = row["status"] in ("edited", "no_detection") and (row["width"], row["height"]) == size
        if not ok:
            disagree.append((case.category, os.path.basename(path)[:40], row["status"], row["error_kind"], detail))
    record(
        "Malformed inputs: whole job (CLI, local)",
        injected="the same 1 025 files as one job's input folder",
        tried=len(cases),
        crashes=int(res.returncode != 0),
        lost=a.lost,
        duplicated=a.duplicated,
        rows_disagreeing_with_decoder=len(disagree),
        statuses=a.statuses,
        errors=a.errors,
        peak_rss_mib=round(job_rss / MIB),
        clean_run_peak_rss_mib=round(base_rss / MIB),
        rss_bound_mib=f"<= clean + {RSS_OVER_CLEAN_RUN // MIB} and <= {RSS_ABSOLUTE // MIB}",
        seconds=round(seconds, 1),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_exactly_once(a)
    assert not disagree, disagree[:10]
    assert job_rss <= base_rss + RSS_OVER_CLEAN_RUN, (job_rss / MIB, base_rss / MIB)
    assert job_rss <= RSS_ABSOLUTE, job_rss / MIB
