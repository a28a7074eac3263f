"""promptpaint against the plain loop a user would write without it, on real photos, end to end.

Makes N real photos (``make_photos``, 0.3-1 MP by default), builds the tiny model set, then in one run
times three processes with the same settings (query "a person", top-1 object, 4 steps, the prompts,
threshold and padding of ``examples/replace.yaml``, lineage off):

  plain   ``benchmarks/plain_loop.py`` (transformers + diffusers, one image at a time)
  ray     ``promptpaint run examples/replace.yaml --set ...`` (Ray executor; Ray start-up included)
  local   the same command with ``--set runtime.executor=local``

Each is a fresh subprocess timed by its wall clock (interpreter start, imports and model loading
included), into a fresh output folder. With ``--repeats R`` the order alternates (plain, ray, local,
local, ray, plain, ...) and the median wall time counts.

Prints one JSON line:
  n, megapixels, cpus, loadavg_start      the inputs and the machine
  {plain,ray,local}_s, _img_s             median wall seconds and images per second end to end
  {plain,ray,local}_steady_img_s          from the output file written 10 % of the way through to the last
                                          (mtimes): the rate once everything has started
  ray_vs_plain, local_vs_plain            throughput ratios end to end (> 1: promptpaint is faster)
  ray_vs_local_steady                     steady-state Ray / local throughput
  {plain,ray,local}_core_ms_per_img       machine-wide CPU time (user+system) per image during the run
                                          (the machine may be shared: an upper bound)
  {ray,local}_stage_ms_per_image          per-stage wall ms per image from promptpaint's ``_SUCCESS``
  plain_stage_ms_per_image                the same split in the plain loop
  {ray,local}_job_s                       promptpaint's own job time (``_SUCCESS`` "seconds": from
                                          run_job start, after the CLI's imports)

Usage: python benchmarks/vs_plain_loop.py [--n 500] [--repeats 1] [--megapixels 0.3 1.0] [--steps 4]
                                          [--models-dir DIR] [--results]
``--results`` appends the figures to benchmarks/RESULTS.md (section "vs_plain_loop.py").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_CONFIG_DIR": "/tmp/yolo-cfg",
    "COMET_DISABLE_AUTO_LOGGING": "1",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

import psutil  # noqa: E402

from promptpaint.samples import make_photos  # noqa: E402
from promptpaint.tiny import build_tiny  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPEC = REPO / "examples" / "replace.yaml"
RESULTS = HERE / "RESULTS.md"
SECTION = "## `vs_plain_loop.py` — promptpaint against a plain transformers + diffusers loop"
QUERY = "a person"


def machine_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + t.nice


def promptpaint_cmd(inp: Path, out: Path, models: str, steps: int, executor: str) -> list[str]:
    exe = Path(sys.executable).parent / "promptpaint"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "promptpaint.cli"]
    sets = {
        "input": str(inp),
        "output": str(out),
        "models_dir": models,
        "detect.queries": f"[{QUERY}]",
        "detect.top_k": "1",
        "mask.instances": "top1",
        "inpaint.steps": str(steps),
        "lineage.mode": "off",
        "runtime.executor": executor,
    }
    cmd += ["run", str(SPEC), "--no-progress"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def plain_cmd(inp: Path, out: Path, models: str, steps: int) -> list[str]:
    # threshold, prompts, guidance and padding: plain_loop.py's defaults are examples/replace.yaml's
    return [
        sys.executable,
        str(HERE / "plain_loop.py"),
        str(inp),
        str(out),
        "--models-dir",
        models,
        "--query",
        QUERY,
        "--steps",
        str(steps),
        "--top-k",
        "1",
    ]


def steady_rate(folder: Path, n: int) -> float | None:
    """Inputs per second from the output image written 10 % of the way through to the last one (file mtimes):
    start-up and the first batches left out. Scaled by inputs / images written (rows without a detection
    take time but write no image)."""
    times = sorted(p.stat().st_mtime for p in folder.rglob("*.png") if "masks" not in p.parts)
    written = len(times)
    k0 = max(1, written // 10)
    if written < 4 or times[-1] <= times[k0]:
        return None
    return (written - 1 - k0) / (times[-1] - times[k0]) * (n / written)


def run_one(kind: str, cmd: list[str], out: Path, n: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cpu0, t0 = machine_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall, cpu = time.perf_counter() - t0, machine_cpu_seconds() - cpu0
    if proc.returncode != 0:
        raise SystemExit(
            f"{kind} failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    res = {"wall": wall, "core_ms": 1000 * cpu / n}
    if kind == "plain":
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        stats = json.loads(line)
        res["stage_ms_per_image"] = stats["stage_ms_per_image"]
        res["written"] = stats["edited"]
        res["steady"] = steady_rate(out, n)
    else:
        summary = json.loads((out / "_SUCCESS").read_text())
        res["stage_ms_per_image"] = summary["stage_ms_per_image"]
        res["job_s"] = summary["seconds"]
        res["written"] = summary["counts"].get("edited", 0)
        res["steady"] = steady_rate(out / "images", n)
    shutil.rmtree(out, ignore_errors=True)
    return res


def order(repeats: int) -> list[str]:
    base = ["plain", "ray", "local"]
    seq: list[str] = []
    for r in range(repeats):
        seq += base if r % 2 == 0 else base[::-1]
    return seq


def append_results(figures: dict, command: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    f = figures
    entry = (
        f"\n### {datetime.date.today().isoformat()}: {f['n']} photos of {f['megapixels'][0]}-{f['megapixels'][1]} MP,"
        f" {f['steps']} steps, {f['repeats']} repeat(s)\n\n"
        f"Command: `{command}`\n\n"
        "| | plain loop | promptpaint, Ray | promptpaint, local |\n"
        "|---|---|---|---|\n"
        f"| wall s (end to end) | {f['plain_s']} | {f['ray_s']} | {f['local_s']} |\n"
        f"| img/s (end to end) | {f['plain_img_s']} | {f['ray_img_s']} | {f['local_img_s']} |\n"
        f"| throughput vs plain | 1.00 | **{f['ray_vs_plain']}** | **{f['local_vs_plain']}** |\n"
        f"| img/s steady (10 % to last file written) | {f['plain_steady_img_s']} | {f['ray_steady_img_s']} |"
        f" {f['local_steady_img_s']} |\n"
        f"| machine core-ms/img | {f['plain_core_ms_per_img']} | {f['ray_core_ms_per_img']} |"
        f" {f['local_core_ms_per_img']} |\n"
        f"| stage ms/img | {_stages(f['plain_stage_ms_per_image'])} | {_stages(f['ray_stage_ms_per_image'])} |"
        f" {_stages(f['local_stage_ms_per_image'])} |\n\n"
        f"```json\n{json.dumps(figures)}\n```\n"
    )
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + _SECTION_INTRO
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    if nxt < 0:
        text = text.rstrip("\n") + "\n" + entry
    else:
        text = text[:nxt].rstrip("\n") + "\n" + entry + text[nxt:]
    RESULTS.write_text(text)


def _stages(d: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in d.items())


_SECTION_INTRO = (
    "Three fresh processes on the same photos, in one run, each timed by its wall clock (interpreter\n"
    "start, imports, model loading and, for Ray, Ray start-up included): `benchmarks/plain_loop.py` (the\n"
    "loop a user would write with transformers + diffusers, one image at a time), `promptpaint run` with\n"
    "the Ray executor and with `runtime.executor=local`. Same settings: `examples/replace.yaml` with query\n"
    '"a person", `detect.top_k=1`, `mask.instances=top1`, 4 steps, lineage off; tiny random-weight models.\n'
    "Throughput ratios > 1 mean promptpaint is faster. Photos from `promptpaint.samples.make_photos`\n"
    "(crops of the photos bundled with ultralytics and matplotlib, JPEG, every 5th PNG). Steady img/s is\n"
    "measured from the output file written 10 % of the way through to the last. Core-ms/img is machine-wide CPU time.\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--megapixels", type=float, nargs=2, default=(0.3, 1.0), metavar=("MIN", "MAX"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models-dir", default=None, help="a built tiny set (default: build one in the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (photos, models)")
    ap.add_argument("--results", action="store_true", help=f"append the figures to {RESULTS.relative_to(REPO)}")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pp-vsplain-"))
    try:
        models = args.models_dir or str(work / "models")
        if args.models_dir is None:
            build_tiny(models)
        inp = work / "in"
        make_photos(inp, args.n, megapixels=tuple(args.megapixels), seed=args.seed)
        # Warm the page cache for the libraries, so the first timed process does not pay it alone.
        subprocess.run([sys.executable, "-c", "import torch, transformers, diffusers, ray"], check=True)
        load0 = os.getloadavg()[0]
        cmds = {
            "plain": plain_cmd(inp, work / "out-plain", models, args.steps),
            "ray": promptpaint_cmd(inp, work / "out-ray", models, args.steps, "ray"),
            "local": promptpaint_cmd(inp, work / "out-local", models, args.steps, "local"),
        }
        outs = {"plain": work / "out-plain", "ray": work / "out-ray", "local": work / "out-local"}
        runs: dict[str, list[dict]] = {k: [] for k in cmds}
        for kind in order(args.repeats):
            runs[kind].append(run_one(kind, cmds[kind], outs[kind], args.n))
            # each run's figures as it ends (stderr), so a long run that gets interrupted still tells something
            print(json.dumps({"run": kind, **runs[kind][-1]}), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    n = args.n

    def med(kind: str, key: str) -> float | None:
        vals = [r[key] for r in runs[kind] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def rnd(x: float | None, d: int) -> float | None:
        return None if x is None else round(x, d)

    fig: dict = {
        "benchmark": "vs_plain_loop",
        "n": n,
        "megapixels": list(args.megapixels),
        "steps": args.steps,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "loadavg_start": round(load0, 2),
    }
    for kind in cmds:
        wall = med(kind, "wall")
        fig[f"{kind}_s"] = round(wall, 2)
        fig[f"{kind}_img_s"] = round(n / wall, 3)
        fig[f"{kind}_steady_img_s"] = rnd(med(kind, "steady"), 3)
        fig[f"{kind}_core_ms_per_img"] = round(med(kind, "core_ms"), 1)
        fig[f"{kind}_written"] = runs[kind][-1]["written"]
    fig["ray_vs_plain"] = round(fig["plain_s"] / fig["ray_s"], 3)
    fig["local_vs_plain"] = round(fig["plain_s"] / fig["local_s"], 3)
    rs, ls = fig["ray_steady_img_s"], fig["local_steady_img_s"]
    fig["ray_vs_local_steady"] = round(rs / ls, 3) if rs and ls else None
    for kind in cmds:
        fig[f"{kind}_stage_ms_per_image"] = runs[kind][-1]["stage_ms_per_image"]
    for kind in ("ray", "local"):
        fig[f"{kind}_job_s"] = round(med(kind, "job_s"), 2)
    print(json.dumps(fig))
    if args.results:
        argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
        append_results(fig, f"python benchmarks/vs_plain_loop.py {argv}".strip())


if __name__ == "__main__":
    main()
