"""Shared pieces of the reliability battery: specs, the exactly-once audit, CLI subprocesses, figures.

Every scenario ends in :func:`record`, which appends one JSON line of figures to the file named by
``PROMPTPAINT_RELIABILITY_OUT`` (when set); ``benchmarks/reliability_report.py`` turns those lines
into the table in RELIABILITY.md. Figures are recorded *before* the assertions, so a failing run
still reports what it saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import psutil
import yaml
from fsspec.implementations.local import LocalFileSystem

from promptpaint import manifest
from promptpaint.actors.writer import utf8_safe
from promptpaint.config import EditSpec, build_spec

ROOT = Path(__file__).resolve().parents[2]
FIGURES_ENV = "PROMPTPAINT_RELIABILITY_OUT"
STATUSES = set(manifest.STATUSES)


# --------------------------------------------------------------------------------------------- figures


def record(scenario: str, *, injected: str, tried: int, crashes: int, lost: int, duplicated: int, **extra: Any) -> dict:
    """One row of the RELIABILITY.md table (plus free-form extras shown as notes)."""
    row = {
        "scenario": scenario,
        "injected": injected,
        "tried": tried,
        "crashes": crashes,
        "lost": lost,
        "duplicated": duplicated,
        **extra,
    }
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False, default=str) + "\n")
    return row


# ----------------------------------------------------------------------------------------------- specs


def spec_dict(inputs: str, output: str, models: Path, **runtime: Any) -> dict[str, Any]:
    """The battery's job: tiny models, 2 denoising steps, batches of 4, lineage off.

    Lineage is pinned off: with it on, every run stamps its own experiment key into the PNG text,
    and the Comet scenario is tested elsewhere.
    """
    return {
        "input": inputs,
        "output": output,
        "models_dir": str(models),
        "detect": {"queries": ["a car", "a dog"], "threshold": 0.55, "top_k": 4},
        "inpaint": {"steps": 2, "seed": 7},
        "lineage": {"mode": "off"},
        "runtime": {"batch_size": {"detect": 4, "segment": 4, "inpaint": 4}, **runtime},
    }


def make_spec(inputs: str, output: str, models: Path, **runtime: Any) -> EditSpec:
    return build_spec(EditSpec, spec_dict(inputs, output, models, **runtime))


def write_spec_file(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------- audit


@dataclass
class Audit:
    """What an output folder holds, measured against the inputs it should describe exactly once."""

    inputs: int
    rows: int
    lost: int  # inputs without a manifest row
    duplicated: int  # manifest rows beyond one per input path
    unexpected: int  # manifest rows for paths that are not inputs
    edited: int  # edited rows
    edited_files: int  # distinct output files among them (write.naming: id -> identical inputs share one)
    images: int  # visible files under images/ (recursive: names keep the input's subfolders)
    masks: int
    missing_files: int  # edited rows whose image or mask is absent
    orphan_images: int  # image files no edited row names
    temp_files: int  # atomic_write leftovers (".name.tmp-uuid")
    success: bool
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return asdict(self)


def _listing(fs: Any, folder: str) -> list[str]:
    """Visible files below ``folder`` (recursive; atomic_write's hidden temp files left out)."""
    if not fs.exists(folder):
        return []
    if isinstance(fs, LocalFileSystem):  # fsspec's find would cut "double::colon.png" at its "::"
        found = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]
    else:
        found = fs.find(folder)
    return sorted(p for p in found if not p.rsplit("/", 1)[-1].startswith("."))


def audit(output: str, inputs: list[str]) -> Audit:
    """Read the manifest and the files under ``output`` and count every way exactly-once can fail."""
    table = manifest.read_manifest(output)
    rows = table.to_pylist() if table is not None else []
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    # The manifest stores non-UTF-8 names in their printable form (see actors/writer.utf8_safe).
    wanted = Counter(utf8_safe(p) for p in inputs)
    seen = Counter(r["input_path"] for r in rows)
    edited = [r for r in rows if r["status"] == "edited"]
    images = _listing(fs, f"{root}/images")
    masks = _listing(fs, f"{root}/masks")
    named = {fs._strip_protocol(r["output_path"]) for r in edited}
    missing = sum(1 for r in edited if not (fs.exists(r["output_path"]) and fs.exists(r["mask_path"])))
    temps = [p for p in fs.find(root) if ".tmp-" in p.rsplit("/", 1)[-1]] if fs.exists(root) else []
    return Audit(
        inputs=len(inputs),
        rows=len(rows),
        lost=sum(1 for p in wanted if p not in seen),
        duplicated=sum(n - 1 for n in seen.values() if n > 1),
        unexpected=sum(1 for p in seen if p not in wanted),
        edited=len(edited),
        edited_files=len(named),
        images=len(images),
        masks=len(masks),
        missing_files=missing,
        orphan_images=sum(1 for p in images if fs._strip_protocol(p) not in named),
        temp_files=len(temps),
        success=manifest.success_exists(output),
        statuses=dict(Counter(r["status"] for r in rows)),
        errors=dict(Counter(r["error_kind"] for r in rows if r["error_kind"])),
    )


def assert_exactly_once(a: Audit, *, temp_files_allowed: bool = False) -> None:
    """Every input exactly once, one image + mask per edited row and nothing else, _SUCCESS last."""
    assert a.lost == 0, f"{a.lost} inputs have no manifest row"
    assert a.duplicated == 0, f"{a.duplicated} duplicate manifest rows"
    assert a.unexpected == 0, f"{a.unexpected} manifest rows for unknown inputs"
    assert a.rows == a.inputs
    assert set(a.statuses) <= STATUSES, a.statuses
    assert a.images == a.edited_files == a.masks, (a.images, a.edited_files, a.masks)
    assert a.missing_files == 0 and a.orphan_images == 0
    if not temp_files_allowed:
        assert a.temp_files == 0, f"{a.temp_files} temporary files left behind"
    assert a.success, "_SUCCESS missing"


def output_files(output: str) -> dict[str, bytes]:
    """images/ and masks/ (visible files only) as {relative path: bytes}."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    out = {}
    for sub in ("images", "masks"):
        for p in _listing(fs, f"{root}/{sub}"):
            out[f"{sub}/{p[len(root) + len(sub) + 2 :]}"] = fs.cat_file(p)
    return out


def manifest_by_id(output: str, drop: tuple[str, ...] = ()) -> dict[tuple[str, str], dict[str, Any]]:
    """Manifest rows keyed by (id, input path), without timing columns (and any columns in ``drop``).

    Keyed by both: inputs with identical bytes share an id but are one row each.
    """
    table = manifest.read_manifest(output)
    rows = table.to_pylist() if table is not None else []
    return {
        (r["id"], r["input_path"]): {
            k: v for k, v in r.items() if not (k.startswith("t_") and k.endswith("_ms")) and k not in drop
        }
        for r in rows
    }


def row_differences(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]]) -> dict[str, int]:
    """Column -> number of shared keys whose rows disagree on it (plus keys present on one side only)."""
    diff: Counter[str] = Counter()
    for key in a.keys() & b.keys():
        for col in a[key].keys() | b[key].keys():
            if a[key].get(col) != b[key].get(col):
                diff[col] += 1
    if a.keys() != b.keys():
        diff["<rows present on one side only>"] = len(a.keys() ^ b.keys())
    return dict(diff)


def difference_examples(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]], limit: int = 3) -> str:
    """A few disagreeing (key, column, value a, value b), for assertion messages."""
    out = []
    for key in sorted(a.keys() & b.keys(), key=str):
        for col in sorted(a[key].keys() | b[key].keys()):
            if a[key].get(col) != b[key].get(col) and len(out) < limit:
                out.append(f"{key} {col}: {str(a[key].get(col))[:300]!r} != {str(b[key].get(col))[:300]!r}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- CLI


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}
    env.pop(FIGURES_ENV, None)
    return env


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "promptpaint.cli", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_args(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT)


def map_workers() -> dict[int, str]:
    """pid -> title of this session's Ray Data actor processes (our descendants: never another job's)."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "ray::MapWorker" in title:
            found[p.pid] = title
    return found


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes in session ``sid`` (a CLI started with start_new_session=True and its children)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def kill_session(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGKILL the process group of ``proc`` and wait until nothing of that session is left."""
    sid = proc.pid  # start_new_session: the child leads its own session and process group
    with contextlib.suppress(ProcessLookupError):  # the group may already be gone
        os.killpg(sid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        for p in left:  # anything that re-grouped itself but kept the session
            with contextlib.suppress(psutil.Error):
                p.kill()
        time.sleep(0.1)
    return len(session_processes(sid))


# --------------------------------------------------------------------------------------------- corpora


def small_corpus(
    folder: Path, n: int, size: tuple[int, int] = (64, 48), seed: int = 3, duplicate: bool = True
) -> list[str]:
    """``n`` synthetic images, the three broken files of ``make_samples`` and (``duplicate``) one
    byte-identical copy of the first image: real folders hold duplicates (two paths, one id, one file).
    """
    from promptpaint.samples import make_samples

    paths = make_samples(folder, n, size=size, seed=seed, broken=True)
    if duplicate:
        dup = folder / "copy_of_first.jpg"
        dup.write_bytes(paths[0].read_bytes())
        paths.append(dup)
    return sorted(str(p) for p in paths)
