"""DreamBooth-LoRA training step: promptpaint on Ray Train (1 and 2 workers) against a plain PyTorch loop.

One run, side by side, the same model, LoRA, batch and number of optimizer steps:

  plain   the loop a user writes by hand, in a fresh child process (run twice: before and after the Ray
          runs, so a change in machine load shows): ``promptpaint.models.load_model`` -> ``LoraModel`` ->
          AdamW over ``named_trainable()`` -> N steps of ``losses(...)`` on fixed random pixels, batch =
          ``batch_size`` instance + ``batch_size`` class images (prior preservation on, weight 1), gradient
          clipping at 1.0, the same per-step seeds (``step_seed``) as the Ray loop, ``--threads`` torch threads.
  ray1    ``promptpaint.training.loop.train_loop`` on Ray Train's ``TorchTrainer`` with 1 worker.
  ray2    the same with 2 workers (gloo on CPU), i.e. twice the global batch per step.

The Ray runs build the ``TorchTrainer`` exactly as ``promptpaint.training.job._train`` does (train_loop config,
``ScalingConfig``, ``TorchConfig``, ``DataConfig(datasets_to_split=[])``, the instance and class datasets
decoded by ``promptpaint.training.data.preprocess`` and materialized before training) but not through
``run_training``: that function keeps only the losses of rank 0's per-step metrics, and this benchmark needs
their timing. It therefore leaves out what ``run_training`` does around the fit (class-image generation,
export, reload check, model card). Instance and class images are random PNGs; ``checkpoint_every`` is larger
than the number of steps, so the only checkpoint is the final one, after the last timed step. Lineage is off.
Each worker gets ``--threads`` CPUs (``cpus_per_worker``), so each uses as many torch threads as the plain loop.

What is timed, per optimizer step, with the first ``--warmup`` (2) steps left out:
  *_step_s     median of the loop's own step time: from ``zero_grad`` to after ``optimizer.step()`` (for Ray,
               the ``step_s`` metric rank 0 puts on its queue; it includes drawing the batch and the all-reduce)
  *_period_s   median time between the ends of successive steps: for the plain loop measured in the loop; for
               Ray, between the arrivals of rank 0's successive per-step messages at the driver. This counts
               everything a step costs (metrics, the queue round trip, Ray's background work), so it is the
               steady-state figure the ratios use.
Peak memory: the plain loop's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (exact peak, whole process, imports
included); for each Ray Train worker process the largest RSS seen by sampling it with psutil every 0.25 s
(a lower bound of its peak; RSS there also counts pages of Ray's object store it has mapped).

Prints one JSON line:
  model, resolution, steps, warmup, batch_per_worker, device, dtype, threads, cpus, loadavg_{start,end}
  plain_step_s, plain_period_s            pooled over both plain runs; plain_{before,after}_period_s each
  ray1_step_s, ray1_period_s, ray1_fit_s  fit_s: TorchTrainer.fit wall time (worker start, model load incl.)
  ray2_step_s, ray2_period_s, ray2_fit_s  null on a single GPU (2 workers need 2 GPUs)
  ray1_vs_plain                           ray1_period_s / plain_period_s (target <= 1.05)
  ray1_vs_plain_step_s                    the same from the in-loop step times
  ray2_vs_ray1                            ray2_period_s / ray1_period_s (1.0 = perfect data-parallel scaling)
  ray2_samples_s_vs_ray1                  training samples per second, 2 workers / 1 worker
  plain_peak_rss_mb, plain_rss_loaded_mb  peak RSS of the plain process at the end / right after model load
  plain_peak_cuda_mb                      on a GPU: torch.cuda.max_memory_allocated of the plain loop
  ray1_worker_peak_rss_mb, ray2_...       per Ray Train worker process (sampled)
  {plain,ray1,ray2}_loss_first, _last     rank 0's loss at the first and last step (sanity, not compared)

GPU (when one is lent): ``--device cuda --dtype float16|bfloat16`` (the Ray runs then use ``use_gpu`` and
``mixed_precision`` fp16/bf16; the 2-worker run is skipped with fewer than 2 GPUs). ``--full-unet`` swaps the
tiny UNet for a random-weight full-size SD 1.5 UNet, ``UNet2DConditionModel(sample_size=64, ...)`` whose other
settings are diffusers' defaults, which are SD 1.5's (320/640/1280/1280 channels, 2 layers per block,
8 attention heads), with ``cross_attention_dim`` set to the tiny text encoder's width. It is written with
the tiny VAE, text encoder and tokenizer into a models folder in the temp dir (~850 M parameters: ~3.4 GB at
float32, 1.7 GB at 16 bit; tens of seconds to build). The tiny VAE downsamples by 2, not 8: use
``--resolution 128`` to give the UNet SD 1.5's 64x64 latents at 512 px. Far too slow for a 2-core CPU.

Usage: python benchmarks/train_step.py [--model sd15] [--models-dir .models/tiny] [--steps 40] [--resolution 64]
                                       [--threads 1] [--batch-size 1] [--device cpu|cuda]
                                       [--dtype float32|float16|bfloat16] [--full-unet] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_CONFIG_DIR": "/tmp/yolo-cfg",
    "COMET_DISABLE_AUTO_LOGGING": "1",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PRECISION = {"float32": "no", "float16": "fp16", "bfloat16": "bf16"}
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
N_INSTANCE = 4
N_CLASS = 4
MB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="a trainable registry model (sd15, sd15-inpaint, sdxl, ...)")
    ap.add_argument("--models-dir", default=str(REPO / ".models" / "tiny"))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1, help="instance images per worker per step (+ as many class)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the plain loop = CPUs per Ray worker")
    ap.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the private Ray instance")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(PRECISION), default="float32")
    ap.add_argument("--full-unet", action="store_true", help="random-weight full-size SD 1.5 UNet (GPU only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (Ray logs, checkpoints)")
    ap.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)  # internal: run the plain loop here
    args = ap.parse_args(argv)
    if args.steps <= args.warmup + 2:
        ap.error(f"--steps must be more than --warmup + 2 ({args.warmup + 2})")
    if args.resolution % 8:
        ap.error("--resolution must be a multiple of 8")
    if args.device == "cpu" and args.dtype == "float16":
        ap.error("float16 needs --device cuda (promptpaint refuses fp16 training on CPU); use bfloat16 or float32")
    return args


def train_spec_dict(args: argparse.Namespace, instance_data: str, workers: int, class_data: str) -> dict[str, Any]:
    """The ``train`` section both sides use (the plain loop reads only the LoRA / loss settings from it)."""
    return {
        "model": args.model,
        "instance_data": instance_data,
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": CLASS_PROMPT,
        "prior_preservation": True,
        "num_class_images": N_CLASS,
        "class_data": class_data,
        "resolution": args.resolution,
        "random_flip": True,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoint_every": args.steps + 1,  # only the final checkpoint, after the last timed step
        "keep_checkpoints": 1,
        "max_failures": 0,
        "num_workers": workers,
        "cpus_per_worker": float(args.threads),
        "use_gpu": args.device == "cuda",
        "mixed_precision": PRECISION[args.dtype],
        "seed": args.seed,
    }


def periods(ends: list[float], warmup: int) -> list[float]:
    """Step k's period = end of step k - end of step k-1, for the steps after the first ``warmup``."""
    return [ends[i] - ends[i - 1] for i in range(max(1, warmup), len(ends))]


def steady(ends: list[float], step_s: list[float], warmup: int) -> dict[str, float]:
    """Median step time and median period over the steps after the first ``warmup``."""
    return {"step_s": statistics.median(step_s[warmup:]), "period_s": statistics.median(periods(ends, warmup))}


# -------------------------------------------------------------------------------------------- the plain loop


def plain_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The hand-written loop; runs in a child process of its own (its ru_maxrss is its peak alone)."""
    import resource

    import torch

    from promptpaint.config import TrainSpec
    from promptpaint.models import load_model
    from promptpaint.training.loop import optimizer_step, step_seed
    from promptpaint.training.model import LoraModel

    torch.set_num_threads(args.threads)
    spec = TrainSpec.model_validate(train_spec_dict(args, "unused", 1, "unused"))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    autocast = dtype != torch.float32

    pipe = load_model(args.model, args.models_dir, device, dtype).model
    model = LoraModel(pipe, spec, device, dtype)
    params = [p for _, p in model.named_trainable()]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    b, side = args.batch_size, args.resolution
    g0 = torch.Generator("cpu").manual_seed(args.seed)
    pixels = torch.rand((2 * b, 3, side, side), generator=g0) * 2 - 1  # instance rows, then class rows
    masks = None
    if model.inpaint:
        masks = torch.zeros((2 * b, 1, side, side))
        masks[:, :, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1.0
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * (2 * b), dtype=torch.float32)
    prompts = [INSTANCE_PROMPT] * b + [CLASS_PROMPT] * b

    ends, step_s, losses_seen = [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        seed = step_seed(spec.seed, 0, step, 0)
        g = torch.Generator("cpu").manual_seed(seed)
        torch.manual_seed(seed)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            losses = model.losses(pixels, prompts, g, masks, time_ids)
        inst, prior = losses[:b].mean(), losses[b:].mean()
        loss = inst + spec.prior_loss_weight * prior
        losses_seen.append(float(inst.detach()) + spec.prior_loss_weight * float(prior.detach()))
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(params, optimizer, scaler)
        t1 = time.perf_counter()
        step_s.append(t1 - t0)
        ends.append(t1)
    return {
        **steady(ends, step_s, args.warmup),
        "ends": ends,
        "step_s_all": step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_loaded_mb": rss_loaded,
        "loss_first": losses_seen[0],
        "loss_last": losses_seen[-1],
        "threads": torch.get_num_threads(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / MB if device.type == "cuda" else None,
    }


def run_plain_child(args: argparse.Namespace, models_dir: str) -> dict[str, Any]:
    argv = [a for a in sys.argv[1:] if a != "--full-unet"]
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--models-dir", models_dir, "--plain-child", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


# ------------------------------------------------------------------------------------------------ Ray Train


class _WorkerRss:
    """Samples the RSS of Ray Train's worker processes (``ray::RayTrainWorker...``) every ``interval`` s; only
    those under this script's Ray instance (an ancestor's command line names ``temp_dir``): other Ray clusters
    on the machine are left out."""

    def __init__(self, temp_dir: str, interval: float = 0.25):
        self.temp_dir = temp_dir
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._procs: dict[int, Any] = {}
        self._last_scan = 0.0

    def __enter__(self) -> _WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _scan(self) -> None:
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid in self._procs or "RayTrainWorker" not in " ".join(p.info["cmdline"] or ()):
                continue
            try:
                if any(self.temp_dir in " ".join(a.cmdline()) for a in p.parents()):
                    self._procs[p.pid] = p
            except psutil.Error:
                continue

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - self._last_scan > 2.0:  # workers start (and restart) late; a full scan costs a few ms
                self._scan()
                self._last_scan = now
            for pid, p in list(self._procs.items()):
                try:
                    self.peak[pid] = max(self.peak.get(pid, 0), p.memory_info().rss)
                except psutil.Error:
                    self._procs.pop(pid)


def ray_datasets(job: Any, side: int) -> dict[str, Any]:
    """The instance and class datasets, as ``job._train`` makes them (decoded + materialized before the fit)."""
    import ray

    from promptpaint.training.data import preprocess
    from promptpaint.training.job import instance_paths

    t = job.train
    kw = {"side": side, "center_crop": t.center_crop, "seed": t.seed}
    rows = [{"index": k, "path": p, "mask_path": ""} for k, p in enumerate(instance_paths(job))]
    class_rows = [{"index": k, "path": str(p)} for k, p in enumerate(sorted(Path(t.class_data).glob("*.png")))]
    return {
        "instance": ray.data.from_items(rows).map_batches(preprocess, fn_kwargs=kw, batch_size=4, num_cpus=0.5)
        .materialize(),
        "class": ray.data.from_items(class_rows).map_batches(preprocess, fn_kwargs=kw, batch_size=8, num_cpus=0.5)
        .materialize(),
    }  # fmt: skip


def ray_fit(job: Any, datasets: dict[str, Any], storage: Path, ray_tmp: Path, warmup: int) -> dict[str, Any]:
    """One ``TorchTrainer.fit`` from ``job.build_trainer`` (what ``promptpaint train`` runs); rank 0's per-step messages timed on arrival."""
    import ray
    from ray.util.queue import Empty, Queue

    from promptpaint.jobs.ray_runtime import cluster_shape
    from promptpaint.training.job import build_trainer, instance_paths, plan_training

    t = job.train
    the_plan = plan_training(job, cluster_shape(), len(instance_paths(job)))
    queue = Queue(actor_options={"num_cpus": 0})
    run = job.model_copy(update={"train": job.train.model_copy(update={
        "storage_path": str(storage), "run_name": f"train-step-w{job.train.num_workers}"})})  # fmt: skip
    trainer = build_trainer(run, the_plan, job.spec_hash(), datasets, queue)
    arrivals: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                item = queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            arrivals.append((time.perf_counter(), item))

    reader = threading.Thread(target=drain, daemon=True)
    with _WorkerRss(str(ray_tmp)) as rss:
        reader.start()
        t0 = time.perf_counter()
        try:
            trainer.fit()
        finally:
            fit_s = time.perf_counter() - t0
            stop.set()
            reader.join(timeout=5)
            while not queue.empty():  # put before the fit ended: not timed (only the last step can be here)
                arrivals.append((time.perf_counter(), queue.get_nowait()))
            ray.kill(queue.actor)
    # rank 0's per-step metrics only (the queue also carries other messages, e.g. each worker's shard)
    arrivals = sorted((a for a in arrivals if "step" in a[1] and a[1].get("rank", 0) == 0), key=lambda a: a[1]["step"])
    steps = [int(m["step"]) for _, m in arrivals]
    if steps != list(range(1, t.max_steps + 1)):
        raise SystemExit(f"rank 0 reported steps {steps}, expected 1..{t.max_steps}")
    return {
        **steady([a for a, _ in arrivals], [float(m["step_s"]) for _, m in arrivals], warmup),
        "fit_s": fit_s,
        "worker_peak_rss_mb": sorted(round(v / MB, 1) for v in rss.peak.values()),
        "loss_first": float(arrivals[0][1]["loss"]),
        "loss_last": float(arrivals[-1][1]["loss"]),
    }


def write_images(folder: Path, n: int, side: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = side + int(rng.integers(0, side // 2 + 1)), side + int(rng.integers(0, side // 2 + 1))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k:06d}.png")


def build_full_unet(args: argparse.Namespace, work: Path, **overrides: Any) -> str:
    """A models folder in ``work`` holding ``args.model`` with a random-weight full-size SD 1.5 UNet and the rest
    (VAE, text encoder, tokenizer, scheduler) linked from ``args.models_dir``. ``overrides``: UNet config (tests)."""
    import torch
    from diffusers import UNet2DConditionModel

    src = Path(args.models_dir) / args.model
    dst = work / "models-full-unet" / args.model
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "unet":
            (dst / item.name).symlink_to(item.resolve())
    tiny = json.loads((src / "unet" / "config.json").read_text())
    text = json.loads((src / "text_encoder" / "config.json").read_text())
    torch.manual_seed(args.seed)
    config = {
        "sample_size": 64,
        "in_channels": tiny["in_channels"],
        "out_channels": tiny["out_channels"],
        "cross_attention_dim": text["hidden_size"],
        **overrides,
    }
    unet = UNet2DConditionModel(**config)  # the other defaults are SD 1.5's
    dtype = getattr(torch, args.dtype)
    (unet if dtype == torch.float32 else unet.to(dtype)).save_pretrained(dst / "unet", safe_serialization=True)
    return str(dst.parent)


def main() -> None:
    args = parse_args()
    if args.plain_child:
        out = plain_loop(args)
        print(json.dumps(out))
        return

    import ray

    from promptpaint.config import TrainJobSpec

    work = Path(tempfile.mkdtemp(prefix="pp-trainstep-"))
    try:
        models_dir = build_full_unet(args, work) if args.full_unet else args.models_dir
        write_images(work / "instance", N_INSTANCE, args.resolution, args.seed)
        write_images(work / "class", N_CLASS, args.resolution, args.seed + 1)
        load0 = os.getloadavg()[0]
        plain_before = run_plain_child(args, models_dir)
        print(json.dumps({"run": "plain_before", **_short(plain_before)}), file=sys.stderr, flush=True)

        cuda = args.device == "cuda"
        gpus = 0
        if cuda:
            import torch

            gpus = torch.cuda.device_count()
        ray.init(
            address="local",  # a private instance: never join another cluster on this machine
            num_cpus=args.ray_cpus,
            num_gpus=gpus,
            object_store_memory=512 * MB,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
            _temp_dir=str(work / "ray-tmp"),
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

        def job_for(workers: int) -> TrainJobSpec:
            return TrainJobSpec.model_validate(
                {
                    "output": str(work / f"out-w{workers}"),
                    "models_dir": models_dir,
                    "train": train_spec_dict(args, str(work / "instance"), workers, str(work / "class")),
                    "lineage": {"mode": "off"},
                }
            )

        runs: dict[str, dict[str, Any] | None] = {}
        try:
            datasets = ray_datasets(job_for(1), args.resolution)
            for workers in (1, 2):
                if cuda and workers > gpus:
                    runs[f"ray{workers}"] = None
                    continue
                runs[f"ray{workers}"] = ray_fit(
                    job_for(workers), datasets, work / "ray-storage", work / "ray-tmp", args.warmup
                )
                print(json.dumps({"run": f"ray{workers}", **runs[f"ray{workers}"]}), file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
        plain_after = run_plain_child(args, models_dir)
        print(json.dumps({"run": "plain_after", **_short(plain_after)}), file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(json.dumps(figures(args, load0, plain_before, plain_after, runs)))


def _short(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("ends", "step_s_all")}


def figures(
    args: argparse.Namespace,
    load0: float,
    before: dict[str, Any],
    after: dict[str, Any],
    runs: dict[str, dict[str, Any] | None],
) -> dict[str, Any]:
    def r(x: float | None, d: int = 4) -> float | None:
        return None if x is None else round(x, d)

    # The plain figures pool the steady steps of both plain runs (before and after the Ray runs).
    pooled = {
        key: statistics.median(vals)
        for key, vals in (
            ("step_s", before["step_s_all"][args.warmup :] + after["step_s_all"][args.warmup :]),
            ("period_s", periods(before["ends"], args.warmup) + periods(after["ends"], args.warmup)),
        )
    }
    fig: dict[str, Any] = {
        "benchmark": "train_step",
        "model": args.model + (" (full-size SD 1.5 UNet, random)" if args.full_unet else ""),
        "resolution": args.resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_per_worker": f"{args.batch_size} instance + {args.batch_size} class",
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "loadavg_start": round(load0, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "plain_step_s": r(pooled["step_s"]),
        "plain_period_s": r(pooled["period_s"]),
        "plain_before_period_s": r(before["period_s"]),
        "plain_after_period_s": r(after["period_s"]),
    }
    for name in ("ray1", "ray2"):
        run = runs.get(name)
        fig[f"{name}_step_s"] = r(run["step_s"]) if run else None
        fig[f"{name}_period_s"] = r(run["period_s"]) if run else None
        fig[f"{name}_fit_s"] = r(run["fit_s"], 1) if run else None
    ray1, ray2 = runs.get("ray1"), runs.get("ray2")
    fig["ray1_vs_plain"] = r(ray1["period_s"] / pooled["period_s"], 3) if ray1 else None
    fig["ray1_vs_plain_step_s"] = r(ray1["step_s"] / pooled["step_s"], 3) if ray1 else None
    fig["ray2_vs_ray1"] = r(ray2["period_s"] / ray1["period_s"], 3) if ray1 and ray2 else None
    fig["ray2_samples_s_vs_ray1"] = r(2 * ray1["period_s"] / ray2["period_s"], 3) if ray1 and ray2 else None
    fig["plain_peak_rss_mb"] = round(max(before["peak_rss_mb"], after["peak_rss_mb"]), 1)
    fig["plain_rss_loaded_mb"] = round(before["rss_loaded_mb"], 1)
    if before.get("peak_cuda_mb") is not None:
        fig["plain_peak_cuda_mb"] = round(before["peak_cuda_mb"], 1)
    for name in ("ray1", "ray2"):
        run = runs.get(name)
        fig[f"{name}_worker_peak_rss_mb"] = run["worker_peak_rss_mb"] if run else None
    fig["plain_loss_first"], fig["plain_loss_last"] = r(before["loss_first"]), r(before["loss_last"])
    for name in ("ray1", "ray2"):
        run = runs.get(name)
        fig[f"{name}_loss_first"] = r(run["loss_first"]) if run else None
        fig[f"{name}_loss_last"] = r(run["loss_last"]) if run else None
    return fig


if __name__ == "__main__":
    main()
