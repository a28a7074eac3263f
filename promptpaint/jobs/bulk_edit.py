"""The bulk job: read -> detect -> segment -> mask -> inpaint [-> score] -> write, on Ray Data or in a loop.

``mode: detect`` stops after detect and ``mode: segment`` after segment (each then exports COCO JSON).

Stages that share a device run *fused* in one process (a ``Chain``): on CPU the whole pipeline is
one actor pool, on GPU the model stages share a GPU actor while reading and writing run as CPU
tasks. Separate pools per stage (``runtime.fuse: none``) only pay off when stages get their own
GPUs: every hand-off serializes a batch of images. The driver only receives small manifest rows.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptpaint import coco, manifest
from promptpaint.actors.common import Batch, as_lists, to_numpy_batch
from promptpaint.actors.detector import Detector
from promptpaint.actors.inpainter import Inpainter
from promptpaint.actors.maskops import MaskOps
from promptpaint.actors.prompts import PromptLoader
from promptpaint.actors.reader import Reader
from promptpaint.actors.scorer import Scorer
from promptpaint.actors.segmenter import Segmenter
from promptpaint.actors.writer import JSON_COLUMNS, TIMING_STAGES, Writer
from promptpaint.config import EditSpec, SpecError
from promptpaint.io import expand_input, remove_temp_files
from promptpaint.lineage import Lineage, job_name, running_stats
from promptpaint.models import ModelNotAvailable, check_task, get_entry, is_available, resolve_source, source_label

MODEL_STAGES = ("detect", "segment", "inpaint", "score")


@dataclass
class StageContext:
    """What a stage needs beyond the spec: the ids to skip and the PNG text to stamp."""

    done_ids: frozenset[str] = frozenset()
    png_text: dict[str, str] = field(default_factory=dict)


# Registry: stage name -> constructor. A stage is a plain class; Ray only wires them.
STAGE_BUILDERS: dict[str, Callable[[EditSpec, StageContext], Callable[[Batch], Batch]]] = {
    "read": lambda s, c: Reader(s.limits, s.spec_hash(), c.done_ids),
    "prompts": lambda s, c: PromptLoader(s.segment.points_file),
    "detect": lambda s, c: Detector(s.detect, s.runtime, s.models_dir),
    "segment": lambda s, c: Segmenter(s.segment, s.runtime, s.models_dir),
    "mask": lambda s, c: MaskOps(s.mask, s.edit_prompts()),
    "inpaint": lambda s, c: Inpainter(s.inpaint, s.runtime, s.models_dir, s.mode, s.detect.texts),
    "score": lambda s, c: Scorer(s.qc, s.runtime, s.models_dir),
    "write": lambda s, c: Writer(s.output, c.png_text, s.mode),
}


def with_prompts(spec: EditSpec, stages: list[str]) -> list[str]:
    """``stages`` with ``prompts`` (sidecar SAM prompts) right before ``detect`` when segment.points_file is set.

    ``prompts`` is not in ``config.STAGES``: it always runs fused with ``detect`` (or after ``read`` in
    the all-in-one actor), so it has no batch size or pool of its own.
    """
    if not spec.segment.points_file or "detect" not in stages or "prompts" in stages:
        return list(stages)
    k = stages.index("detect")
    return [*stages[:k], "prompts", *stages[k:]]


class Chain:
    """Several stages in one process, run back to back on each batch (stage fusion).

    Loads every model once in ``__init__``; ``__call__`` takes a Ray numpy batch or a dict of lists.
    """

    def __init__(
        self,
        spec: EditSpec,
        stages: list[str],
        ctx: StageContext | None = None,
        num_threads: int | None = None,
        numpy_out: bool = False,
    ):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)  # torch threads = the CPUs this actor was given
        ctx = ctx or StageContext()
        self.stages = [STAGE_BUILDERS[name](spec, ctx) for name in stages]
        self.numpy_out = numpy_out
        self.models = {
            st.stage: {
                "name": st.loaded.entry.name,
                "source": st.loaded.source,
                "revision": st.loaded.revision,
            }
            for st in self.stages
            if hasattr(st, "loaded")
        }

    def __call__(self, batch: dict[str, Any]) -> Any:
        b = as_lists(batch)
        for st in self.stages:
            b = st(b)
        if self.models:  # merge with what upstream chains recorded
            n = len(b["id"])
            prev = [json.loads(x) if x else {} for x in b.get("models", [""] * n)]
            b["models"] = [json.dumps({**p, **self.models}, sort_keys=True) for p in prev]
        return to_numpy_batch(b) if self.numpy_out else b


def run_cpu_group(batch: dict[str, Any], spec: EditSpec, stages: list[str], ctx: StageContext) -> Any:
    """Stateless CPU stages as Ray tasks (their constructors are trivial)."""
    return Chain(spec, stages, ctx, numpy_out=True)(batch)


@dataclass
class Group:
    """Consecutive stages fused into one Ray Data operator."""

    stages: list[str]
    batch_size: int
    pool: int
    num_cpus: float
    num_gpus: float

    @property
    def uses_model(self) -> bool:
        return any(s in MODEL_STAGES for s in self.stages)


def plan_groups(spec: EditSpec, device_type: str, total_cpus: float) -> list[Group]:
    """Decide which stages fuse, and each group's pool, batch size and resources."""
    rt = spec.runtime
    fuse = rt.fuse
    if fuse == "auto":
        fuse = "all" if device_type == "cpu" else "models"
    stages = spec.stages()
    if fuse == "all":
        parts = [stages]
    elif fuse == "models":
        parts = [stages[:1], stages[1:-1], stages[-1:]]  # read | every model stage and mask ops | write
    else:
        parts = [[s] for s in stages]
    parts = [with_prompts(spec, p) for p in parts]
    groups = []
    for stages in parts:
        models = [s for s in stages if s in MODEL_STAGES]
        key = models[-1] if models else stages[0]
        pool = rt.pool(key)
        gpus = max((rt.num_gpus.get(s, 1.0 if device_type == "cuda" else 0.0) for s in models), default=0.0)
        if models:
            # The fused CPU actor owns the machine's cores; separate pools get a fraction so two
            # pools on 2 cores do not wait on each other forever.
            cpus = rt.num_cpus or (max(total_cpus / pool, 1.0) if len(parts) == 1 else 0.5)
        else:
            cpus = 0.5
        batch = min((rt.batch(s) for s in models), default=rt.batch(key))
        groups.append(Group(stages, batch, pool, cpus, gpus))
    return groups


@dataclass
class JobResult:
    output: str
    inputs: int
    counts: dict[str, int]
    errors: dict[str, int]
    seconds: float
    summary: dict[str, Any]

    @property
    def images_per_second(self) -> float:
        return self.summary["images_per_second"]


MODEL_FIELDS = {"detect": "detect.model", "segment": "segment.model", "inpaint": "inpaint.model", "score": "qc.model"}


def model_names(spec: EditSpec) -> dict[str, str]:
    """Stage -> registry name of its model, for the stages this mode runs; SpecError (exit 2) for a name
    that is unknown or of the wrong task, naming the spec key."""
    names = {"detect": spec.detect.model, "segment": spec.segment.model, "inpaint": spec.inpaint.model}
    names["score"] = spec.qc.model
    out = {}
    for stage in (s for s in spec.stages() if s in MODEL_STAGES):
        try:
            get_entry(names[stage])
        except ValueError as e:  # unknown name
            raise SpecError(f"invalid spec: {MODEL_FIELDS[stage]}: {e}") from None
        try:
            check_task(names[stage], stage, MODEL_FIELDS[stage])
        except ValueError as e:  # a model of another task; the message names the key
            raise SpecError(f"invalid spec: {e}") from None
        out[stage] = names[stage]
    return out


def check_models(spec: EditSpec) -> dict[str, dict[str, str | None]]:
    """Fail before any work if a model cannot be found; returns what will be loaded from where."""
    out = {}
    for stage, name in model_names(spec).items():
        entry = get_entry(name)
        source, local = resolve_source(name, spec.models_dir)
        if not is_available(name, spec.models_dir):
            raise ModelNotAvailable(
                f"model {name!r} for stage {stage} is not available: looked in "
                f"{spec.models_dir or '<models_dir unset>'}/{name} and the local caches for "
                f"{source_label(entry)}. Fix: set models_dir (or PROMPTPAINT_MODELS_DIR) to a "
                "folder holding it, download it with network access (unset HF_HUB_OFFLINE / YOLO_OFFLINE), or run "
                "`promptpaint models build-tiny DIR` for the random-weight test set."
            )
        out[stage] = {"name": name, "source": source, "revision": "local" if local else entry.revision}
    return out


class _Consumer:
    """Driver side: turn slim result rows into manifest rows, count, show progress, feed lineage."""

    def __init__(self, spec: EditSpec, total: int, progress: bool, lineage: Lineage):
        self.spec = spec
        self.lineage = lineage
        self.lineage_cols = {
            "experiment_key": lineage.key,
            "lineage_mode": lineage.mode,
            "lineage_artifact": lineage.artifact_note(),
        }
        self.writer = manifest.ManifestWriter(spec.output, spec.runtime.manifest_every)
        self.flat_spec = {f"spec.{k}": _scalar(v) for k, v in spec.flat().items()}
        self.spec_hash = spec.spec_hash()
        self.seen: set[tuple[str, str]] = set()
        self.rows = 0
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.stage_ms: Counter[str] = Counter()
        self.bar = _progress_bar(total, progress)

    def consume(self, batch: dict[str, Any]) -> None:
        rows = []
        n = len(batch["id"])
        for i in range(n):
            row = {k: _py(v[i]) for k, v in batch.items()}
            key = (row["id"], row["path"])
            self.rows += 1
            self.bar.update(1)
            if key in self.seen:  # a retried task delivered this row twice: the manifest has it
                continue
            self.counts[row["status"]] += 1
            if row["status"] == "skipped":  # already in the manifest from an earlier run
                continue
            self.seen.add(key)
            if row["error_kind"]:
                self.errors[row["error_kind"]] += 1
            for s in TIMING_STAGES:
                self.stage_ms[s] += row.get(f"t_{s}_ms", 0.0)
            rows.append(self._manifest_row(row))
            self.lineage.see(rows[-1])
        self.writer.add(rows)

    def _manifest_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {k: row[k] for k in row if k not in ("path", "models", *JSON_COLUMNS)}
        out["input_path"] = row["path"]
        for c in JSON_COLUMNS:
            out[c] = json.loads(row[c])
        out["spec_hash"] = self.spec_hash
        out.update(self.lineage_cols)
        for stage, info in json.loads(row.get("models") or "{}").items():
            for k, v in info.items():
                out[f"model.{stage}.{k}"] = v
        out.update(self.flat_spec)
        return out

    def close(self) -> None:
        self.writer.close()
        self.bar.close()


def _scalar(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="promptpaint", disable=not enabled, file=sys.stderr)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _local_batches(spec: EditSpec, paths: list[str], ctx: StageContext) -> Iterable[dict[str, Any]]:
    chain = Chain(spec, with_prompts(spec, spec.stages()), ctx)
    # The smallest model batch of the mode, as the fused Ray actor uses: same batches, same bytes.
    size = min(spec.runtime.batch(s) for s in spec.stages() if s in MODEL_STAGES)
    for chunk in _chunks(paths, size):
        yield chain({"path": chunk})


class RayJobError(RuntimeError):
    """A Ray Data task of the job failed; the message is Ray's (the exception itself is not kept)."""


def _ray_batches(spec: EditSpec, paths: list[str], ctx: StageContext) -> Iterable[dict[str, Any]]:
    import ray

    from promptpaint.jobs.ray_runtime import cluster_cpus, cluster_device, ensure_ray

    ensure_ray()
    groups = plan_groups(spec, cluster_device(spec.runtime), cluster_cpus())
    # One block = one batch, everywhere: batch composition then never depends on timing (blocks that
    # Ray bundles differently would change batched CPU kernels' last bits, and so the output bytes).
    rows = min(g.batch_size for g in groups)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, math.ceil(len(paths) / rows)))
    for g in groups:
        if g.uses_model:
            ds = ds.map_batches(
                Chain,
                fn_constructor_kwargs={
                    "spec": spec,
                    "stages": g.stages,
                    "ctx": ctx,
                    "num_threads": max(1, int(g.num_cpus)),
                    "numpy_out": True,
                },
                compute=ray.data.ActorPoolStrategy(size=g.pool, enable_true_multi_threading=True),
                batch_size=None,  # whole blocks (see above)
                batch_format="numpy",
                num_cpus=g.num_cpus,
                num_gpus=g.num_gpus,
            )
        else:
            ds = ds.map_batches(
                run_cpu_group,
                fn_kwargs={"spec": spec, "stages": g.stages, "ctx": ctx},
                batch_size=None,  # whole blocks (see above)
                batch_format="numpy",
                num_cpus=g.num_cpus,
            )
    failure = None
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as e:
        # Keep only the text. Ray's exception reaches the failed dataset's executor through its frames,
        # and with it the actor pool and every CPU the pool reserved: while anything holds the exception
        # (a notebook's sys.last_value, a log record, a retry loop) the next job in this process waits
        # for those CPUs forever.
        failure = f"{type(e).__name__}: {e}"
    if failure is not None:
        raise RayJobError(failure)


def describe_plan(spec: EditSpec, paths: list[str], done: int) -> str:
    from promptpaint.jobs.ray_runtime import local_cpus

    model_names(spec)  # a wrong model name fails the dry run as it would fail the job
    device = spec.runtime.resolve()[0].type if spec.runtime.device != "auto" else "auto"
    groups = plan_groups(spec, "cpu" if device in ("auto", "cpu") else device, local_cpus())
    lines = [
        f"inputs: {len(paths)} files matching {spec.input!r}",
        *[f"  {p}" for p in paths[:10]],
        *([f"  ... and {len(paths) - 10} more"] if len(paths) > 10 else []),
        f"already in the manifest: {done} ids (skipped after hashing their bytes)",
        f"output: {spec.output}  (spec hash {spec.spec_hash()})",
        f"executor: {spec.runtime.executor}, fuse: {spec.runtime.fuse}",
    ]
    for g in groups:
        lines.append(
            f"  stage group {'+'.join(g.stages)}: pool {g.pool}, batch {g.batch_size}, "
            f"{g.num_cpus:g} CPU, {g.num_gpus:g} GPU per worker"
        )
    n = len(paths)
    calls = {s: math.ceil(n / spec.runtime.batch(s)) for s in spec.stages() if s in MODEL_STAGES}
    lines.append(
        "model calls (at most, before skipping done ids and images without detections): "
        + ", ".join(f"{s} {c} batches" for s, c in calls.items())
        + (f"; inpaint denoising steps per image: {spec.inpaint.steps}" if "inpaint" in calls else "")
    )
    if spec.mode in coco.EXPORT_STATUSES:
        lines.append(f"export: {spec.output}/{coco.COCO_FILE} (COCO {spec.mode} format)")
    return "\n".join(lines)


def run_job(
    spec: EditSpec,
    progress: bool = True,
    incremental: bool = False,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    spec_path: str | None = None,
) -> JobResult:
    """Run the bulk edit; returns the summary. Per-row failures are rows, not exceptions.

    Inputs whose id (content hash + spec hash) is already in the manifest are skipped after reading
    their bytes. ``incremental`` also skips input *paths* this spec already processed, unread.
    ``on_batch`` sees each result batch (manifest columns) as it reaches the driver.
    """
    t0 = time.perf_counter()
    # 1. Inputs, models and what is already done.
    all_paths = expand_input(spec.input)
    models = check_models(spec)
    # Lineage opens before any model work: its key goes into every PNG and manifest row, and
    # lineage.require fails here, not after hours of GPU time.
    lineage = Lineage.start(spec, job_name(spec), spec_path, models)
    # (id, path) pairs, not ids: an input whose bytes equal one recorded under another path still
    # needs its own manifest row.
    done = frozenset(manifest.done_keys(spec.output))
    paths = all_paths
    if incremental:
        seen = manifest.done_paths(spec.output, spec.spec_hash())
        paths = [p for p in all_paths if p not in seen]
    manifest.clear_success(spec.output)
    remove_temp_files(spec.output)  # a killed run's half-written files; no writer of ours runs yet
    ctx = StageContext(
        done_ids=done,
        png_text={
            "promptpaint:spec_hash": spec.spec_hash(),
            "promptpaint:prompt": spec.inpaint.prompt,
            "promptpaint:negative_prompt": spec.inpaint.negative_prompt,
            "promptpaint:models": json.dumps(models, sort_keys=True),
            "promptpaint:experiment_key": lineage.key,
        },
    )
    # 2. Stream results into the manifest as they arrive.
    consumer = _Consumer(spec, len(paths), progress, lineage)
    consumer.counts["skipped"] += len(all_paths) - len(paths)
    batches = _local_batches if spec.runtime.executor == "local" else _ray_batches
    try:
        for batch in batches(spec, paths, ctx):
            consumer.consume(batch)
            lineage.on_batch(running_stats(consumer.counts, consumer.errors, consumer.stage_ms, t0), consumer.rows)
            if on_batch is not None:
                on_batch(batch)
    except BaseException as e:
        consumer.close()
        lineage.abort(f"{type(e).__name__}: {e}")
        raise
    consumer.close()
    export = None
    if spec.mode in coco.EXPORT_STATUSES:  # from the whole manifest: earlier runs' rows count too
        export = coco.export(spec.output, spec.mode, spec.detect.texts, spec.input, spec.spec_hash())
    # 3. Summary, then _SUCCESS last.
    seconds = time.perf_counter() - t0
    processed = sum(v for k, v in consumer.counts.items() if k != "skipped")
    summary = {
        "inputs": len(all_paths),
        "processed": processed,
        "counts": dict(consumer.counts),
        "errors": dict(consumer.errors),
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "stage_ms_per_image": {
            s: round(consumer.stage_ms[s] / max(processed, 1), 3) for s in TIMING_STAGES if s in spec.stages()
        },
        "spec_hash": spec.spec_hash(),
        "models": models,
        "manifest_rows_written": consumer.writer.rows,
        "mode": spec.mode,
    }
    if export is not None:
        summary["coco"] = export
    summary["lineage"] = lineage.finish(summary, manifest.combine(consumer.writer.written), spec.to_yaml())
    manifest.write_success(spec.output, summary)
    return JobResult(spec.output, len(all_paths), dict(consumer.counts), dict(consumer.errors), seconds, summary)


def format_summary(result: JobResult) -> str:
    s = result.summary
    lines = [
        f"promptpaint: {s['inputs']} inputs -> {result.output}",
        f"  {'processed':<14}{s['processed']:>8}",
    ]
    main = {"detect": "detected", "segment": "segmented"}.get(s.get("mode", "edit"), "edited")
    for status in manifest.STATUSES:
        if status == main or result.counts.get(status, 0):
            lines.append(f"  {status:<14}{result.counts.get(status, 0):>8}")
    for kind, n in sorted(result.errors.items()):
        lines.append(f"    error {kind:<16}{n:>6}")
    lines.append(f"  {'images/s':<14}{s['images_per_second']:>8.2f}   ({s['seconds']:.1f} s wall)")
    per_stage = ", ".join(f"{k} {v:.1f}" for k, v in s["stage_ms_per_image"].items())
    lines.append(f"  ms per image by stage: {per_stage}")
    if "coco" in s:
        c = s["coco"]
        lines.append(f"  coco export: {c['images']} images, {c['annotations']} annotations -> {c['path']}")
    lin = s.get("lineage", {})
    if lin.get("mode", "off") != "off":
        where = lin.get("offline_archive") or "online"
        lines.append(f"  comet ({lin['mode']}): experiment {lin['experiment_key']} -> {where}")
        if lin.get("degraded"):
            lines.append(f"  comet logging degraded, lineage kept in the manifest: {lin['degraded']}")
    return "\n".join(lines)
