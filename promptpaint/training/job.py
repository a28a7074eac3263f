"""``promptpaint train``: the driver side of a DreamBooth-LoRA run on Ray Train.

1. Plan (pure, ``plan_training``): workers, GPU or CPU, precision, resolution, images, steps, memory estimate;
   every spec problem is a SpecError (exit 2) before Ray Train starts.
2. Inputs: the instance photos; ``masks: auto`` runs promptpaint's own detect -> segment job on them (its
   output, manifest included, stays in ``<output>/automask``); class images come from the cache or a Ray Data
   generation job.
3. ``TorchTrainer.fit`` with ``FailureConfig`` and checkpoints in ``<storage_path>/<run_name>``: running the same
   command again resumes from the newest checkpoint. Rank 0 streams per-step metrics and validation images
   to the driver through a Ray queue; the driver owns the one Comet experiment of the run.
4. Export: ``<output>/pytorch_lora_weights.safetensors`` (diffusers format + promptpaint's lineage metadata),
   reloaded into a fresh pipeline that must change its output, then the model card and the spec.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from promptpaint.config import SpecError, TrainJobSpec
from promptpaint.io import atomic_write, exists, expand_input, join, local_path, read_bytes
from promptpaint.jobs.plan import ClusterShape
from promptpaint.lora import LORA_FILE, META_KEY
from promptpaint.models.registry import get_entry

log = logging.getLogger(__name__)

RUN_MARKER = "promptpaint_train.json"  # in <storage>/<run>: which spec the run's checkpoints belong to
SUMMARY = "training.json"
SPEC_FILE = "train.yaml"
CARD = "README.md"
# Rough per-worker memory for one 512 px sample (activations for backward, fp16), by architecture.
_ACTIVATION_GB_512 = {"sd1": 3.0, "sd2": 3.2, "sdxl": 9.0}
_BASE_PARAMS_M = {"sd1": 1066, "sd2": 1290, "sdxl": 3470}  # UNet + VAE + text encoder(s), millions


class TrainingFailed(RuntimeError):
    """Training stopped (worker errors past max_failures, a LoRA that changes nothing): exit 1."""


@dataclass(frozen=True)
class TrainPlan:
    model: str
    arch: str
    inpainting: bool
    workers: int
    use_gpu: bool
    precision: str  # no | fp16 | bf16
    resolution: int
    instance_images: int
    class_images: int
    class_model: str | None
    steps: int
    global_batch: int  # instance images per optimizer step over all workers
    threads: int
    memory_gb: float  # rough per-worker estimate

    def describe(self) -> str:
        prior = f"{self.class_images} class images ({self.class_model})" if self.class_images else "no prior images"
        return "\n".join(
            [
                f"train {self.model} ({self.arch}{', inpainting' if self.inpainting else ''}) LoRA",
                f"  workers: {self.workers} x {'GPU' if self.use_gpu else f'CPU ({self.threads} threads)'}, "
                f"precision {self.precision}",
                f"  images: {self.instance_images} instance, {prior}, at {self.resolution}x{self.resolution}",
                f"  steps: {self.steps}, {self.global_batch} instance image(s) per step "
                f"({self.steps * self.global_batch / max(1, self.instance_images):.1f} epochs)",
                f"  memory: ~{self.memory_gb:.1f} GB per worker (rough estimate)",
            ]
        )


def native_side(name: str, models_dir: str | None) -> int:
    """The model's natural square side: UNet sample size x VAE scale from a local folder's configs, else the
    registry's (512 SD 1.x/2.x, 1024 SDXL)."""
    from promptpaint.models.registry import resolve_source

    source, local = resolve_source(name, models_dir)
    if local:
        unet = json.loads(Path(source, "unet", "config.json").read_text())
        vae = json.loads(Path(source, "vae", "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    return int(get_entry(name).default_resolution or 512)


def plan_training(job: TrainJobSpec, shape: ClusterShape, instance_images: int) -> TrainPlan:
    t = job.train
    entry = get_entry(t.model)
    total_gpus = sum(int(n.gpus) for n in shape.nodes)
    use_gpu = total_gpus > 0 if t.use_gpu == "auto" else bool(t.use_gpu)
    if use_gpu and t.num_workers > total_gpus:
        raise SpecError(
            f"invalid spec: train.num_workers={t.num_workers} needs {t.num_workers} GPUs; the cluster has {total_gpus}"
        )
    biggest = max(n.cpus for n in shape.nodes)
    if t.cpus_per_worker > biggest:
        raise SpecError(
            f"invalid spec: train.cpus_per_worker={t.cpus_per_worker} is more than any node has ({biggest:g} CPUs)"
        )
    fit = sum(int(n.cpus // t.cpus_per_worker) for n in shape.nodes)
    if t.num_workers > fit:  # Ray Train would wait for the resources forever
        raise SpecError(
            f"invalid spec: train.num_workers={t.num_workers} x cpus_per_worker={t.cpus_per_worker} does not fit the "
            f"cluster's nodes (room for {fit}); lower num_workers or cpus_per_worker"
        )
    precision = t.mixed_precision
    if precision == "auto":
        precision = "fp16" if use_gpu else "no"
    if precision == "fp16" and not use_gpu:
        raise SpecError("invalid spec: train.mixed_precision=fp16 needs GPUs; this run has none (use bf16 or no)")
    side = t.resolution or native_side(t.model, job.models_dir)
    arch = entry.arch or "sd1"
    bytes_per = 2 if precision in ("fp16", "bf16") else 4
    params = _local_params(t.model, job.models_dir) or _BASE_PARAMS_M[arch] * 1e6
    weights_gb = params * bytes_per / 1e9
    samples = t.batch_size * (2 if t.prior_preservation else 1)
    # activations scale with the UNet's size; the table is for the real checkpoints
    act = _ACTIVATION_GB_512[arch] * samples * (side / 512) ** 2 * (bytes_per / 2)
    act *= min(1.0, params / (_BASE_PARAMS_M[arch] * 1e6))
    if t.gradient_checkpointing:
        act /= 3
    return TrainPlan(
        model=t.model,
        arch=arch,
        inpainting=t.inpainting,
        workers=t.num_workers,
        use_gpu=use_gpu,
        precision=precision,
        resolution=side,
        instance_images=instance_images,
        class_images=t.num_class_images if t.prior_preservation else 0,
        class_model=t.resolved_class_model() if t.prior_preservation else None,
        steps=t.max_steps,
        global_batch=t.batch_size * t.gradient_accumulation * t.num_workers,
        threads=max(1, int(t.cpus_per_worker)),
        memory_gb=round(weights_gb + act + 0.5, 1),
    )


def _local_params(name: str, models_dir: str | None) -> float | None:
    """Parameter count of a local pipeline folder, from its safetensors headers (no weights read)."""
    from promptpaint.lora import read_header
    from promptpaint.models.registry import resolve_source

    source, local = resolve_source(name, models_dir)
    if not local:
        return None
    total = 0
    for f in Path(source).rglob("*.safetensors"):
        tensors, _ = read_header(str(f))
        total += sum(math.prod(v["shape"]) for v in tensors.values())
    return float(total) or None


def instance_paths(job: TrainJobSpec) -> list[str]:
    try:
        return expand_input(job.train.instance_data)
    except FileNotFoundError as e:
        raise SpecError(f"invalid spec: train.instance_data: {e}") from None


def describe_training(job: TrainJobSpec, shape: ClusterShape | None = None) -> str:
    from promptpaint.jobs.bulk_edit import local_shape

    paths = instance_paths(job)
    the_plan = plan_training(job, shape or local_shape(), len(paths))
    lines = [the_plan.describe(), f"  output: {job.output}", f"  checkpoints: {join(job.storage_path, job.run_name)}"]
    if job.train.inpainting:
        lines.append(f"  masks: {job.train.masks}" + (f" (query {job.train.resolved_mask_query()!r})"
                                                       if job.train.masks == "auto" else ""))  # fmt: skip
    return "\n".join(lines)


@dataclass
class TrainResult:
    output: str
    lora: str  # the LoRA file
    steps: int
    final_loss: float | None
    resumed_from: int  # step of the checkpoint this run started from (0 = fresh)
    class_generated: int
    lora_sha256: str
    effect: float  # max |output with LoRA - without| of the reload check
    experiment_key: str
    already_done: bool = False
    losses: list[float] = field(default_factory=list)
    automask: dict[str, Any] = field(default_factory=dict)
    shards: dict[int, dict[str, list[int]]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- driver


def _models_available(job: TrainJobSpec, class_model: str | None) -> dict[str, dict[str, Any]]:
    from promptpaint.models import is_available, resolve_source, source_label, weights_fingerprint
    from promptpaint.models.base import ModelNotAvailable

    out = {}
    for role, name in (("base", job.train.model), ("class", class_model)):
        if name is None:
            continue
        if not is_available(name, job.models_dir):
            raise ModelNotAvailable(
                f"model {name!r} ({role}) is not available: looked in {job.models_dir or '<models_dir unset>'}/{name} "
                f"and the local caches for {source_label(get_entry(name))}"
            )
        source, local = resolve_source(name, job.models_dir)
        out[role] = {
            "name": name,
            "source": source,
            "revision": "local" if local else get_entry(name).revision,
            "weights": weights_fingerprint(name, job.models_dir),
        }
    return out


def _existing(job: TrainJobSpec, spec_hash: str) -> dict[str, Any] | None:
    """The summary of a finished run of this very spec in the output folder, if there is one."""
    summary = join(job.output, SUMMARY)
    if not exists(summary) or not exists(join(job.output, LORA_FILE)):
        return None
    data = json.loads(read_bytes(summary))
    return data if data.get("spec_hash") == spec_hash else None


def _claim_run(job: TrainJobSpec, spec_hash: str) -> None:
    """Tie ``<storage>/<run>`` to this spec; a different spec there is an error, not a silent mixed resume."""
    marker = join(job.storage_path, job.run_name, RUN_MARKER)
    if exists(marker):
        held = json.loads(read_bytes(marker)).get("spec_hash")
        if held != spec_hash:
            raise SpecError(
                f"invalid spec: {join(job.storage_path, job.run_name)} holds checkpoints of another training spec "
                f"({held}, this one is {spec_hash}); set train.run_name (or output) to start a new run there, or "
                "delete that folder"
            )
        return
    atomic_write(marker, json.dumps({"spec_hash": spec_hash, "created": _now()}).encode())


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_training(
    job: TrainJobSpec,
    progress: bool = True,
    spec_path: str | None = None,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume) the LoRA the spec describes; Ray must be initialised (``ensure_ray``).

    ``fault`` is a test hook: ``{"step": k, "marker": path}`` makes the last worker raise once at step k.
    """

    from promptpaint.jobs.ray_runtime import cluster_shape
    from promptpaint.lineage import Lineage

    shape = cluster_shape()
    paths = instance_paths(job)
    the_plan = plan_training(job, shape, len(paths))
    models = _models_available(job, the_plan.class_model)
    job = job.with_identity({"weights": models["base"]["weights"], "precision": the_plan.precision})
    spec_hash = job.spec_hash()
    done = _existing(job, spec_hash)
    if done is not None:
        return TrainResult(
            output=job.output,
            lora=join(job.output, LORA_FILE),
            steps=int(done["steps"]),
            final_loss=done.get("final_loss"),
            resumed_from=int(done["steps"]),
            class_generated=0,
            lora_sha256=done["lora_sha256"],
            effect=float(done["effect"]),
            experiment_key=done.get("experiment_key", ""),
            already_done=True,
        )
    _claim_run(job, spec_hash)

    lineage = Lineage.start(job, f"train-{job.run_name}", spec_path, models)  # type: ignore[arg-type]
    try:
        result = _train(job, the_plan, paths, models, spec_hash, lineage, progress, fault)
    except BaseException as e:
        lineage.abort(f"{type(e).__name__}: {e}")
        raise
    return result


def _train(
    job: TrainJobSpec,
    the_plan: TrainPlan,
    paths: list[str],
    models: dict[str, Any],
    spec_hash: str,
    lineage: Any,
    progress: bool,
    fault: dict[str, Any] | None,
) -> TrainResult:
    import ray
    from ray.util.queue import Queue

    from promptpaint.training.class_images import ensure_class_images
    from promptpaint.training.data import preprocess

    t = job.train
    side = the_plan.resolution
    # 1. Inputs: instance rows (+ the subject's masks), class images.
    automask: dict[str, Any] = {}
    masks: dict[str, str] = {}
    if t.inpainting and t.masks == "auto":
        automask = run_automask(job, paths)
        masks = automask["masks"]
    rows = [{"index": k, "path": p, "mask_path": masks.get(p, "")} for k, p in enumerate(paths)]
    # Decoded before Ray Train starts (materialized): the workers then hold every CPU the run asked for, and
    # no data task waits for one of them.
    kw = {"side": side, "center_crop": t.center_crop, "seed": t.seed}
    datasets = {"instance": ray.data.from_items(rows).map_batches(preprocess, fn_kwargs=kw, batch_size=4,
                                                                  num_cpus=0.5).materialize()}  # fmt: skip
    class_generated = 0
    if t.prior_preservation:
        gpus = sum(n.gpus for n in ray_shape_nodes())
        cls = ensure_class_images(
            job, side, models["class"]["weights"], gpus, max(1.0, min(n.cpus for n in ray_shape_nodes()))
        )
        class_generated = cls.generated
        class_rows = [{"index": k, "path": p} for k, p in enumerate(cls.paths)]
        datasets["class"] = (
            ray.data.from_items(class_rows)
            .map_batches(preprocess, fn_kwargs=kw, batch_size=8, num_cpus=0.5)
            .materialize()
        )

    # 2. Ray Train.
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(job, the_plan, spec_hash, datasets, queue, fault)
    monitor = _Monitor(queue, lineage, t.max_steps, progress, job)
    monitor.start()
    try:
        fit = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; report the root cause
        from promptpaint.jobs.bulk_edit import root_cause

        raise TrainingFailed(f"training failed: {_worker_error(root_cause(e))}") from None
    finally:
        monitor.stop()
        ray.kill(queue.actor)
    if fit.checkpoint is None:
        raise TrainingFailed("training ended without a checkpoint")

    # 3. Export, verify, document.
    return _finish(job, the_plan, models, spec_hash, lineage, fit, monitor, class_generated, automask)


def _worker_error(exc: BaseException) -> str:
    """The first failing worker's own error (Ray Train wraps them in a WorkerGroupError), one line."""
    from promptpaint.jobs.bulk_edit import root_cause

    failures = getattr(exc, "worker_failures", None) or {}
    where = ""
    if failures:
        rank = min(failures)
        exc, where = root_cause(failures[rank]), f" (worker {rank})"
    lines = [x for x in str(exc).splitlines() if x.strip()]
    return f"{type(exc).__name__}: {(lines[-1] if failures and lines else (lines or [''])[0])[:500]}{where}"


def build_trainer(
    job: TrainJobSpec,
    the_plan: TrainPlan,
    spec_hash: str,
    datasets: dict[str, Any],
    queue: Any,
    fault: dict[str, Any] | None = None,
) -> Any:
    """The run's ``TorchTrainer``: the loop, its config, workers, storage (``<storage_path>/<run_name>``, where a
    re-run finds its checkpoints), failure and checkpoint policy, unsplit datasets, gloo or NCCL."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from promptpaint.training.loop import train_loop

    t = job.train
    config = {
        "spec": job.model_dump(mode="json"),
        "spec_hash": spec_hash,
        "use_gpu": the_plan.use_gpu,
        "precision": the_plan.precision,
        "resolution": the_plan.resolution,
        "threads": the_plan.threads,
        "queue": queue,
        "fault": fault,
    }
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if the_plan.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=the_plan.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=_storage_uri(job.storage_path),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        torch_config=TorchConfig(backend="nccl" if the_plan.use_gpu else "gloo"),
    )


def ray_shape_nodes() -> tuple[Any, ...]:
    from promptpaint.jobs.ray_runtime import cluster_shape

    return cluster_shape().nodes


def _storage_uri(path: str) -> str:
    local = local_path(path)
    if local is not None:
        Path(local).mkdir(parents=True, exist_ok=True)
        return str(Path(local).resolve())
    return path


class _Monitor:
    """Driver thread: drains rank 0's per-step metrics into a progress bar and the Comet experiment, and saves
    validation images to ``<output>/validation/``."""

    def __init__(self, queue: Any, lineage: Any, total: int, progress: bool, job: TrainJobSpec):
        from tqdm.auto import tqdm

        self.queue, self.lineage, self.job = queue, lineage, job
        self.bar = tqdm(total=total, unit="step", desc="train", disable=not progress, file=sys.stderr)
        self.losses: dict[int, float] = {}
        self.first_step: int | None = None
        self.validation: dict[int, list[str]] = {}
        self.shards: dict[int, dict[str, list[int]]] = {}  # rank -> example indices it trains on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptpaint-train-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain(block=False)
        self.bar.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=True)

    def _drain(self, block: bool) -> None:
        from ray.util.queue import Empty

        try:
            item = self.queue.get(block=block, timeout=0.5) if block else self.queue.get_nowait()
        except (Empty, Exception):  # noqa: BLE001 - the queue actor is gone once training ended
            return
        self._handle(item)
        if not block:
            self._drain(block=False)

    def _handle(self, m: dict[str, Any]) -> None:
        if "shard" in m:
            self.shards[int(m["rank"])] = m["shard"]
            return
        step = int(m["step"])
        if self.first_step is None:
            self.first_step = step - 1
        self.losses[step] = float(m["loss"])
        self.bar.n = step
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", refresh=False)
        self.bar.refresh()
        scalars = {k: v for k, v in m.items() if isinstance(v, int | float) and k not in ("rank", "step")}
        self.lineage._safe(lambda: self.lineage.exp.log_metrics(scalars, step=step))
        if m.get("validation"):
            files = []
            for k, png in enumerate(m["validation"]):
                uri = join(self.job.output, "validation", f"step-{step:06d}-{k}.png")
                atomic_write(uri, png)
                files.append(uri)
                prompt = self.job.train.validation_prompts[k]
                self.lineage._safe(
                    lambda uri=uri, prompt=prompt, k=k: self.lineage.exp.log_image(
                        local_path(uri) or uri, name=f"validation/{k}", step=step, metadata={"prompt": prompt}
                    )
                )
            self.validation[step] = files


def _finish(
    job: TrainJobSpec,
    the_plan: TrainPlan,
    models: dict[str, Any],
    spec_hash: str,
    lineage: Any,
    fit: Any,
    monitor: _Monitor,
    class_generated: int,
    automask: dict[str, Any],
) -> TrainResult:
    import ray

    from promptpaint.lora import inspect_lora
    from promptpaint.training.loop import EXPORT, STATE

    t = job.train
    with fit.checkpoint.as_directory() as folder:
        steps = int(json.loads(Path(folder, STATE).read_text())["step"])
        exported = Path(folder, EXPORT, LORA_FILE)
        if steps != t.max_steps or not exported.is_file():
            raise TrainingFailed(f"the last checkpoint ({folder}, step {steps}) holds no final LoRA")
        base = models["base"]
        meta = {
            "arch": the_plan.arch,
            "base_model": t.model,
            "base_source": base["source"],
            "base_revision": base["revision"],
            "base_weights": base["weights"],
            "inpainting": the_plan.inpainting,
            "run_name": job.run_name,
            "spec_hash": spec_hash,
            "instance_prompt": t.instance_prompt,
            "class_prompt": t.class_prompt,
            "steps": steps,
            "rank": t.lora.rank,
            "alpha": t.lora.alpha or t.lora.rank,
            "text_encoder": t.lora.text_encoder,
            "experiment_key": lineage.key,
            "trained_at": _now(),
        }
        data = _with_metadata(exported, meta)
    lora_uri = join(job.output, LORA_FILE)
    atomic_write(lora_uri, data)
    info = inspect_lora(job.output)
    # The reload check: stock diffusers loading into a fresh pipeline must change a fixed-seed output.
    resources = {"num_gpus": 1} if the_plan.use_gpu else {"num_cpus": min(1.0, t.cpus_per_worker)}
    effect = ray.get(
        ray.remote(**resources)(verify_lora).remote(
            t.model, job.models_dir, lora_uri, the_plan.resolution, the_plan.use_gpu
        )  # fmt: skip
    )
    if not effect > EFFECT_MIN:
        raise TrainingFailed(
            f"the trained LoRA changes nothing: reloaded into a fresh {t.model} pipeline, a fixed-seed image differs "
            f"by {effect:.2e} at most (steps {steps}, learning_rate {t.learning_rate}); train longer or with a higher "
            "learning rate"
        )
    losses = [monitor.losses[k] for k in sorted(monitor.losses)]
    final_loss = fit.metrics.get("loss") if fit.metrics else (losses[-1] if losses else None)
    summary = {
        "spec_hash": spec_hash,
        "run_name": job.run_name,
        "steps": steps,
        "final_loss": final_loss,
        "resumed_from": monitor.first_step or 0,
        "lora": lora_uri,
        "lora_sha256": info.sha256,
        "effect": effect,
        "experiment_key": lineage.key,
        "plan": the_plan.__dict__,
        "models": models,
        "class_generated": class_generated,
        "automask": {k: v for k, v in automask.items() if k != "masks"},
        "validation": {str(k): v for k, v in monitor.validation.items()},
        "shards": {str(k): v for k, v in sorted(monitor.shards.items())},
        "checkpoint": fit.checkpoint.path,
    }
    atomic_write(join(job.output, SPEC_FILE), job.to_yaml().encode())
    atomic_write(join(job.output, CARD), model_card(job, the_plan, summary, monitor).encode())
    atomic_write(join(job.output, SUMMARY), json.dumps(summary, indent=2, default=str).encode())
    _log_lineage(lineage, job, summary, lora_uri)
    return TrainResult(
        output=job.output,
        lora=lora_uri,
        steps=steps,
        final_loss=final_loss,
        resumed_from=monitor.first_step or 0,
        class_generated=class_generated,
        lora_sha256=info.sha256,
        effect=effect,
        experiment_key=lineage.key,
        losses=losses,
        automask={k: v for k, v in automask.items() if k != "masks"},
        shards=dict(monitor.shards),
    )


# Max |difference| (0..1 float image) below which a LoRA "changes nothing": half an 8-bit level, so no pixel of
# the saved image would move. (Any float difference is not enough: adding ~0 through peft's layers already
# perturbs a 2-step tiny pipeline's output by ~2e-6.)
EFFECT_MIN = 0.5 / 255


def _with_metadata(file: Path, meta: dict[str, Any]) -> bytes:
    """The safetensors file's bytes with promptpaint's lineage added to its metadata (tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(file), framework="pt") as f:
        old = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return save(tensors, metadata={**old, META_KEY: json.dumps(meta, sort_keys=True)})


def verify_lora(model: str, models_dir: str | None, lora: str, side: int, use_gpu: bool) -> float:
    """Max |image with the LoRA - image without| for a fixed seed, loading the LoRA the way users do
    (``pipe.load_lora_weights``) into a freshly loaded base pipeline."""
    import numpy as np
    import torch
    from PIL import Image

    from promptpaint.lora import apply_loras
    from promptpaint.models import load_model

    device = torch.device("cuda" if use_gpu else "cpu")
    dtype = torch.float16 if use_gpu else torch.float32
    loaded = load_model(model, models_dir, device, dtype)
    pipe = loaded.model
    kwargs: dict[str, Any] = {}
    if get_entry(model).task == "inpaint":
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mask = np.zeros((side, side), np.uint8)
        mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        kwargs = {"image": Image.fromarray(image), "mask_image": Image.fromarray(mask)}

    def image() -> np.ndarray:
        return pipe(
            prompt="a photo",
            height=side,
            width=side,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            **kwargs,
        ).images[0]

    with torch.inference_mode():
        before = image()
    apply_loras(pipe, [(lora, 1.0)], model, "lora")
    with torch.inference_mode():
        after = image()
    return float(np.abs(np.asarray(after, np.float64) - np.asarray(before, np.float64)).max())


def run_automask(job: TrainJobSpec, paths: list[str]) -> dict[str, Any]:
    """The subject's masks from promptpaint's own detect -> segment job (mode segment) on the instance photos.

    Output (masks/, manifest/) in ``<output>/automask``. Returns {query, job summary, masks: path -> mask file,
    areas: path -> mask pixels, without: paths where nothing was found (they train with random masks)}.
    """
    from promptpaint.config import EditSpec, build_spec
    from promptpaint.jobs.bulk_edit import run_job
    from promptpaint.manifest import read_manifest

    t = job.train
    query = t.resolved_mask_query()
    edit = build_spec(
        EditSpec,
        {
            "input": t.instance_data,
            "output": join(job.output, "automask"),
            "models_dir": job.models_dir,
            "mode": "segment",
            "detect": {"model": t.mask_detect_model, "queries": [query], "threshold": t.mask_threshold},
            "segment": {"model": t.mask_segment_model},
            "lineage": {"mode": "off"},
            "runtime": job.runtime.model_dump(),
        },
        source="train.masks=auto",
    )
    summary = run_job(edit, progress=False)
    table = read_manifest(edit.output)
    masks, areas = {}, {}
    if table is not None:
        for row in table.select(["input_path", "status", "mask_path"]).to_pylist():
            if row["status"] == "segmented" and row["mask_path"] and row["input_path"] in paths:
                masks[row["input_path"]] = row["mask_path"]
                areas[row["input_path"]] = _mask_area(row["mask_path"])
    without = [p for p in paths if p not in masks]
    if without:
        log.warning("masks: auto found no %r in %d of %d photos; those train with random masks", query,
                    len(without), len(paths))  # fmt: skip
    return {
        "query": query,
        "output": edit.output,
        "summary": getattr(summary, "counts", {}),
        "masks": masks,
        "areas": areas,
        "without": without,
    }


def _mask_area(uri: str) -> int:
    import io

    import numpy as np
    from PIL import Image

    return int((np.asarray(Image.open(io.BytesIO(read_bytes(uri)))) > 0).sum())


def model_card(job: TrainJobSpec, the_plan: TrainPlan, summary: dict[str, Any], monitor: _Monitor) -> str:
    """``README.md`` next to the LoRA: what it is, how it was made, how to use it."""
    t = job.train
    base = summary["models"]["base"]
    hp = {
        "rank": t.lora.rank,
        "alpha": t.lora.alpha or t.lora.rank,
        "dropout": t.lora.dropout,
        "target_modules": ", ".join(t.lora.target_modules),
        "text_encoder LoRA": t.lora.text_encoder,
        "learning_rate": t.learning_rate,
        "lr_scheduler": f"{t.lr_scheduler} (warm-up {t.lr_warmup_steps})",
        "steps": summary["steps"],
        "batch per worker": t.batch_size,
        "gradient_accumulation": t.gradient_accumulation,
        "workers": the_plan.workers,
        "precision": the_plan.precision,
        "gradient_checkpointing": t.gradient_checkpointing,
        "snr_gamma": t.snr_gamma,
        "resolution": the_plan.resolution,
        "prior_preservation": f"{t.prior_preservation} ({the_plan.class_images} images, weight {t.prior_loss_weight})",
        "masks": t.masks if the_plan.inpainting else "n/a (text-to-image)",
        "seed": t.seed,
    }
    lines = [
        "---",
        f"base_model: {base['source']}",
        "library_name: diffusers",
        "tags: [lora, dreambooth, promptpaint, " + ("inpainting" if the_plan.inpainting else "text-to-image") + "]",
        f"instance_prompt: {json.dumps(t.instance_prompt)}",
        "---",
        "",
        f"# {job.run_name}: DreamBooth LoRA for {t.model}",
        "",
        f"Trained with promptpaint on `{base['source']}` (revision `{base['revision']}`, weights "
        f"`{base['weights']}`): token prompt **{t.instance_prompt!r}**, class prompt {t.class_prompt!r}.",
        "",
        "## Use it",
        "",
        "```python",
        f"pipe.load_lora_weights({job.output!r})  # stock diffusers",
        "```",
        "",
        "```bash",
        f"promptpaint generate {json.dumps(t.instance_prompt + ' on the moon')} --lora {job.output} --out out/",
        f"promptpaint run spec.yaml --set inpaint.prompt={json.dumps(t.instance_prompt)} "
        f"--set 'inpaint.lora=[{{path: {job.output}, scale: 0.9}}]'",
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in hp.items()],
        "",
        f"Final loss: {summary['final_loss']}; LoRA sha256 `{summary['lora_sha256']}`; spec hash "
        f"`{summary['spec_hash']}`; Comet experiment `{summary['experiment_key'] or 'off'}`.",
        f"Reload check: with the LoRA a fixed-seed image changes by up to {summary['effect']:.3g} (0..1 scale).",
    ]
    if summary["automask"]:
        am = summary["automask"]
        lines += ["", f"Masks: `{am['query']}` found by promptpaint's detect -> segment job ({am['output']}); "
                  f"{len(am['without'])} photo(s) without a detection trained with random masks."]  # fmt: skip
    if monitor.validation:
        lines += ["", "## Validation images", ""]
        for step, files in sorted(monitor.validation.items()):
            for k, f in enumerate(files):
                rel = f[len(job.output) :].lstrip("/") if f.startswith(job.output) else f
                lines.append(f"- step {step}, {t.validation_prompts[k]!r}: ![]({rel})")
    return "\n".join(lines) + "\n"


def _log_lineage(lineage: Any, job: TrainJobSpec, summary: dict[str, Any], lora_uri: str) -> None:
    if lineage.exp is None:
        return

    def go() -> None:
        exp = lineage.exp
        exp.log_others({f"train.{k}": str(v) for k, v in summary.items() if not isinstance(v, dict)})
        exp.log_asset_data(read_bytes(lora_uri), name=LORA_FILE)
        exp.log_asset_data(read_bytes(join(job.output, CARD)), name=CARD)
        if lineage.mode == "online":
            import comet_ml

            art = comet_ml.Artifact(name=f"lora-{job.run_name}", artifact_type="model",
                                    metadata={"spec_hash": summary["spec_hash"], "sha256": summary["lora_sha256"]})  # fmt: skip
            local = local_path(lora_uri)
            if local:
                art.add(local, logical_path=LORA_FILE)
            else:
                art.add_remote(lora_uri, logical_path=LORA_FILE)
            exp.log_artifact(art)

    lineage._safe(go)
    lineage._end()


def format_summary(result: TrainResult) -> str:
    if result.already_done:
        return f"already trained: {result.lora} ({result.steps} steps, sha256 {result.lora_sha256[:12]}); nothing to do"
    lines = [
        f"trained {result.steps} steps"
        + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""),
        f"  LoRA: {result.lora} (sha256 {result.lora_sha256[:12]})",
        f"  final loss: {result.final_loss:.4f}" if result.final_loss is not None else "  final loss: n/a",
        f"  reload check: output changes by up to {result.effect:.3g}",
        f"  class images generated: {result.class_generated}",
    ]
    if result.automask:
        lines.append(f"  masks: auto ({result.automask['query']!r}), {len(result.automask['without'])} photo(s) "
                     "without a detection")  # fmt: skip
    return "\n".join(lines)
