"""What does Ray cost? The same stage objects in a bare loop and through the Ray Data job, in one run.

Prints one JSON line:
  loop_img_s                 bare loop over the fused stages, after its first batch (steady state)
  loop_img_s_total           the same loop from its first batch (models loaded beforehand)
  ray_img_s_steady           the Ray job from its first result to its last (steady state)
  ray_img_s_total            the Ray job end to end: Ray start, actor start and model loading included
  ratio_steady, ratio_total  Ray / loop
  ray_first_result_s         run_job start -> first result at the driver (Ray + actor start-up, one batch)
  model_core_ms_per_img      CPU time inside detect/segment/inpaint, measured in the loop
  outside_models_core_ms_per_img_{loop,ray}  machine-wide CPU time per image, minus the model CPU time

Usage: python benchmarks/bulk_edit_overhead.py [--n 500] [--size 256] [--steps 4] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(k, v)

import psutil  # noqa: E402

from promptpaint.config import STAGES, EditSpec, build_spec  # noqa: E402
from promptpaint.jobs.bulk_edit import MODEL_STAGES, Chain, StageContext, run_job  # noqa: E402
from promptpaint.samples import make_samples  # noqa: E402
from promptpaint.tiny import build_tiny  # noqa: E402


def machine_cpu_seconds() -> float:
    """CPU time (user + system) the whole machine has spent: Ray's processes are not all our children."""
    t = psutil.cpu_times()
    return t.user + t.system + t.nice


def loop(spec: EditSpec, paths: list[str]) -> dict[str, float]:
    """The fused stages in a for-loop; CPU time of the model stages measured per stage."""
    chain = Chain(spec, list(STAGES), StageContext())
    batch = spec.runtime.batch("inpaint")
    model_cpu = 0.0
    cpu0, t0 = machine_cpu_seconds(), time.perf_counter()
    for i in range(0, len(paths), batch):
        b = {"path": paths[i : i + batch]}
        for st in chain.stages:
            c = time.process_time()
            b = st(b)
            if st.stage in MODEL_STAGES:
                model_cpu += time.process_time() - c
        if i == 0:  # the first batch pays lazy initialisation; steady state starts after it
            t_first, cpu_first, model_first = time.perf_counter(), machine_cpu_seconds(), model_cpu
    wall, cpu = time.perf_counter() - t0, machine_cpu_seconds() - cpu0
    return {
        "wall": wall,
        "cpu": cpu,
        "steady_wall": time.perf_counter() - t_first,
        "steady_cpu": machine_cpu_seconds() - cpu_first,
        "steady_model_cpu": model_cpu - model_first,
        "steady_rows": len(paths) - min(batch, len(paths)),
    }


def ray_job(spec: EditSpec, n: int) -> dict[str, float]:
    """The real job (run_job) on a fresh local Ray; timestamps of the first and last result."""
    import ray

    marks: list[tuple[float, float, int]] = []

    def mark(batch: dict) -> None:  # when each task block's summary reaches the driver
        marks.append((time.perf_counter(), machine_cpu_seconds(), batch["rows"]))

    try:
        cpu0, t0 = machine_cpu_seconds(), time.perf_counter()
        run_job(spec, progress=False, on_batch=mark)
        wall = time.perf_counter() - t0
        cpu = machine_cpu_seconds() - cpu0
    finally:
        ray.shutdown()
    (t_first, c_first, n_first) = marks[0]
    (t_last, c_last, _) = marks[-1]
    steady_rows = n - n_first
    return {
        "wall": wall,
        "cpu": cpu,
        "first": t_first - t0,
        "steady_wall": t_last - t_first,
        "steady_cpu": c_last - c_first,
        "steady_rows": steady_rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models-dir", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pp-bench-"))
    models = args.models_dir or str(work / "models")
    if args.models_dir is None:
        build_tiny(models)
    paths = [str(p) for p in make_samples(work / "in", args.n, size=(args.size, args.size), seed=0)]
    spec = build_spec(
        EditSpec,
        {
            "input": str(work / "in"),
            "output": str(work / "out-loop"),
            "models_dir": models,
            "detect": {"queries": ["a car"], "threshold": 0.55, "top_k": 4},
            "inpaint": {"steps": args.steps},
            "runtime": {"batch_size": {s: args.batch for s in ("detect", "segment", "inpaint")}},
        },
    )
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    lp = loop(spec, paths)
    rj = ray_job(spec.model_copy(update={"output": str(work / "out-ray")}), args.n)

    n = args.n
    loop_ips = lp["steady_rows"] / lp["steady_wall"]
    steady_ips = rj["steady_rows"] / rj["steady_wall"]
    model_ms = 1000 * lp["steady_model_cpu"] / lp["steady_rows"]
    print(
        json.dumps(
            {
                "benchmark": "bulk_edit_overhead",
                "images": n,
                "size": args.size,
                "steps": args.steps,
                "batch": args.batch,
                "cpus": os.cpu_count(),
                "loop_img_s": round(loop_ips, 2),
                "loop_img_s_total": round(n / lp["wall"], 2),
                "ray_img_s_steady": round(steady_ips, 2),
                "ray_img_s_total": round(n / rj["wall"], 2),
                "ratio_steady": round(steady_ips / loop_ips, 3),
                "ratio_total": round((n / rj["wall"]) / (n / lp["wall"]), 3),
                "ray_first_result_s": round(rj["first"], 2),
                "model_core_ms_per_img": round(model_ms, 1),
                "outside_models_core_ms_per_img_loop": round(1000 * lp["steady_cpu"] / lp["steady_rows"] - model_ms, 1),
                "outside_models_core_ms_per_img_ray": round(1000 * rj["steady_cpu"] / rj["steady_rows"] - model_ms, 1),
            }
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
