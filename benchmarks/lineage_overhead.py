"""What does Comet lineage cost? The same job with lineage off and offline, side by side in one run.

Prints one JSON line: wall seconds of each mode (median of --repeats runs, alternating), their ratio,
the number of Comet messages the offline archive holds, and the image count. The job runs in the
local executor so Ray start-up noise does not swamp the difference.

Usage: python benchmarks/lineage_overhead.py [--n 200] [--repeats 3] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

for k, v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "COMET_DISABLE_AUTO_LOGGING": "1",
    "COMET_ERROR_TRACKING_ENABLE": "false",
}.items():
    os.environ.setdefault(k, v)

from promptpaint.config import EditSpec, build_spec  # noqa: E402
from promptpaint.jobs.bulk_edit import run_job  # noqa: E402
from promptpaint.samples import make_samples  # noqa: E402
from promptpaint.tiny import build_tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models-dir", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pp-lineage-"))
    models = args.models_dir or str(work / "models")
    if args.models_dir is None:
        build_tiny(models)
    make_samples(work / "in", args.n, size=(128, 96), seed=0)
    base = {
        "input": str(work / "in"),
        "models_dir": models,
        "detect": {"queries": ["a car"], "threshold": 0.55, "top_k": 4},
        "inpaint": {"steps": 2},
        "runtime": {"executor": "local"},
    }
    walls: dict[str, list[float]] = {"off": [], "offline": []}
    messages = 0
    for r in range(args.repeats):
        for mode in ("off", "offline"):
            out = work / f"out-{mode}-{r}"
            spec = build_spec(EditSpec, {**base, "output": str(out), "lineage": {"mode": mode}})
            t0 = time.perf_counter()
            run_job(spec, progress=False)
            walls[mode].append(time.perf_counter() - t0)
            if mode == "offline":
                (archive,) = glob.glob(str(out / "comet" / "*.zip"))
                with zipfile.ZipFile(archive) as z:
                    messages = len(z.read("messages.json").splitlines())
    off, offline = statistics.median(walls["off"]), statistics.median(walls["offline"])
    print(
        json.dumps(
            {
                "benchmark": "lineage_overhead",
                "images": args.n,
                "repeats": args.repeats,
                "wall_s_off": round(off, 2),
                "wall_s_offline": round(offline, 2),
                "ratio_offline_over_off": round(offline / off, 3),
                "comet_messages": messages,
            }
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
