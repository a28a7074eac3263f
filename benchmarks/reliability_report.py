"""Run the reliability battery (tests/reliability) and print its figures as the RELIABILITY.md table.

Each scenario's test appends one JSON line of figures to the file named by PROMPTPAINT_RELIABILITY_OUT
(scenario, injected, tried, crashes, lost, duplicated, plus notes); this script sets that variable,
runs pytest, and renders the lines as markdown -- the table is never typed by hand.

Usage:
  python benchmarks/reliability_report.py                      # run the battery, print the table
  python benchmarks/reliability_report.py --figures F.jsonl    # only render figures from an earlier run
  python benchmarks/reliability_report.py -- -k "not heavy"    # extra pytest arguments after --

Exit code: pytest's (0 when the battery passed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("scenario", "injected", "tried", "crashes", "lost", "duplicated")


def run_battery(figures: Path, junit: Path, extra: list[str]) -> tuple[int, float]:
    env = {**os.environ, "PROMPTPAINT_RELIABILITY_OUT": str(figures)}
    cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-m", "reliability", "-q", "-p", "no:cacheprovider"]
    cmd += ["-W", "ignore", f"--junitxml={junit}", *extra]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr).returncode
    return rc, time.perf_counter() - t0


def test_outcomes(junit: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Counts by outcome, and (test, reason) for strict xfails (known issues awaiting a fix)."""
    counts = {"passed": 0, "failed": 0, "xfailed": 0, "skipped": 0}
    known = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif (skip := case.find("skipped")) is not None:
            if skip.get("type") == "pytest.xfail":
                counts["xfailed"] += 1
                known.append((name, skip.get("message", "")))
            else:
                counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, known


def _note(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def table(rows: list[dict]) -> str:
    out = [
        "| scenario | injected | tried | crashes | lost | duplicated | other figures |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = "; ".join(f"{k}: {_note(v)}" for k, v in r.items() if k not in CORE)
        cells = [str(r.get(k, "")) for k in CORE] + [notes]
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out)


def environment() -> str:
    versions = []
    for pkg in ("torch", "ray", "pillow", "hypothesis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.system()} {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}, " + ", ".join(
        versions
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figures", type=Path, help="render this JSONL instead of running the battery")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()

    if args.figures:
        rows = [json.loads(line) for line in args.figures.read_text().splitlines() if line.strip()]
        print(table(rows))
        return 0

    with tempfile.TemporaryDirectory(prefix="promptpaint-reliability-") as tmp:
        figures, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        figures.touch()
        rc, seconds = run_battery(figures, junit, args.pytest_args)
        rows = [json.loads(line) for line in figures.read_text().splitlines() if line.strip()]
        counts, known = test_outcomes(junit) if junit.exists() else ({}, [])
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"Command: `python benchmarks/reliability_report.py` ({when})  ")
    print(f"Machine: {environment()}  ")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    print(f"pytest: {summary}; wall time {seconds:.0f} s\n")
    print(table(rows))
    if known:
        print("\nKnown issues pinned as strict xfails (they fail once fixed, so the marker goes):\n")
        for name, reason in known:
            print(f"- `{name}`: {reason.removeprefix('reason: ')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
