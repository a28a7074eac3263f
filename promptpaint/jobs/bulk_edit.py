"""The bulk job: read -> detect -> segment -> mask -> inpaint [-> score] -> write, on Ray Data or in a loop.

``promptpaint.jobs.plan`` decides (purely) which stages fuse, the rows per block and per model call, the
pools and each actor's resources; this module runs that plan. Both executors consume the same plan: the
local loop runs one ``Chain`` over blocks of ``block_rows`` inputs, Ray Data runs one Chain per group over
blocks of the same size, and every Chain splits a block into each stage's own batch size. So both make
the same model calls on the same rows, and write the same bytes.

The driver lists the inputs, chooses output names, receives slim manifest rows only (never images), adds
the run-level columns (models, spec fields, lineage), writes manifest parts as rows arrive, and stops the
job when too many rows fail in a model stage or in our own code (``limits.max_error_rate``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptpaint import coco, manifest
from promptpaint.actors.common import Batch, as_lists, concat_batches, split_batch, to_numpy_batch
from promptpaint.actors.detector import Detector
from promptpaint.actors.inpainter import Inpainter
from promptpaint.actors.maskops import MaskOps
from promptpaint.actors.prompts import PromptLoader
from promptpaint.actors.reader import Reader
from promptpaint.actors.scorer import Scorer
from promptpaint.actors.segmenter import Segmenter
from promptpaint.actors.writer import JSON_COLUMNS, TIMING_STAGES, Writer
from promptpaint.config import EditSpec
from promptpaint.io import iter_inputs, remove_temp_files
from promptpaint.jobs.plan import MODEL_STAGES, ClusterShape, Plan, format_plan, plan, task_blocks
from promptpaint.lineage import Lineage, job_name, running_stats
from promptpaint.models import (
    ModelNotAvailable,
    get_entry,
    is_available,
    resolve_source,
    source_label,
    weights_fingerprint,
)

__all__ = [
    "Chain",
    "JobFailed",
    "JobResult",
    "Listing",
    "RayJobError",
    "describe_plan",
    "format_summary",
    "prepare",
    "run_job",
]

# Error kinds the breaker counts: a broken stage, not a bad input file.
BREAKER_KINDS = ("model_error", "internal_error")


@dataclass
class StageContext:
    """What a stage needs beyond the spec: the ids to skip and the PNG text to stamp; and what the recorder
    (the end of the last group) needs: the run's part prefix, the run-level manifest columns, lineage's share."""

    done_ids: frozenset[Any] = frozenset()
    png_text: dict[str, str] = field(default_factory=dict)
    run: str = ""  # manifest part prefix (manifest.new_run); "" = return rows, write no part (serve, tests)
    run_cols: dict[str, Any] = field(default_factory=dict)
    fingerprint: bool = False  # lineage on: sum the block's ids for the dataset fingerprint
    sample_k: int = 0  # lineage's sample size: the block's k smallest ids go to the driver


# Task-block bookkeeping columns, set by the listing and carried around the stages (never a stage's business):
# ``block``, the task block's place in the listing (its first row); ``listed``, inputs listed when it was cut;
# ``last``, 1 on the listing's last block (whose ``listed`` is then the number of inputs).
CARRIED = ("block", "listed", "last")


# Registry: stage name -> constructor. A stage is a plain class; Ray only wires them.
STAGE_BUILDERS: dict[str, Callable[[EditSpec, StageContext], Callable[[Batch], Batch]]] = {
    "read": lambda s, c: Reader(s.limits, s.spec_hash(), c.done_ids),
    "prompts": lambda s, c: PromptLoader(s.segment.points_file),
    "detect": lambda s, c: Detector(s.detect, s.runtime, s.models_dir),
    "segment": lambda s, c: Segmenter(s.segment, s.runtime, s.models_dir),
    "mask": lambda s, c: MaskOps(s.mask, s.edit_prompts()),
    "inpaint": lambda s, c: Inpainter(s.inpaint, s.runtime, s.models_dir, s.mode, s.detect.texts),
    "score": lambda s, c: Scorer(s.qc, s.runtime, s.models_dir),
    "write": lambda s, c: Writer(s.output, c.png_text, s.mode, s.write),
}


class Chain:
    """Several stages in one process, run back to back on each task block (stage fusion).

    Loads every model once in ``__init__``. ``__call__`` takes a task block (a Ray numpy batch or a dict of
    lists), cuts it into blocks of ``block_rows`` and runs each stage on slices of ``stage_batch[stage]`` rows
    of a block (the whole block for stages without a batch size), so a block makes the same model calls
    whichever process runs which stages and however blocks were grouped into task blocks. A chain that ends
    with ``write`` and has a ``ctx.run`` records: it writes the block's manifest part and returns one
    summary row instead of the rows (see ``Recorder``).
    """

    def __init__(
        self,
        spec: EditSpec,
        stages: list[str] | tuple[str, ...],
        ctx: StageContext | None = None,
        stage_batch: dict[str, int] | None = None,
        num_threads: int | None = None,
        handoff: bool = False,
        block_rows: int | None = None,
    ):
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)  # torch threads = the CPUs this actor was given
        ctx = ctx or StageContext()
        self.names = list(stages)
        self.stages = [STAGE_BUILDERS[name](spec, ctx) for name in self.names]
        self.stage_batch = dict(stage_batch or {})
        self.block_rows = block_rows
        self.handoff = handoff
        self.recorder = Recorder(spec, ctx) if ctx.run and self.names[-1:] == ["write"] else None
        self.node = ""  # set by the Ray executor: the node this process runs on (a manifest column)

    def __call__(self, batch: dict[str, Any]) -> Any:
        b = concat_batches([self._task(t) for t in task_blocks_of(as_lists(batch))])
        return to_numpy_batch(b, handoff=self.handoff) if self.handoff else b

    def _task(self, b: Batch) -> Batch:
        carried = {k: b.pop(k) for k in CARRIED if k in b}
        blocks = split_batch(b, self.block_rows) if self.block_rows else [b]
        b = concat_batches([self._run(block) for block in blocks])
        if self.node:
            b["node"] = [self.node] * len(b["id"])
        b.update(carried)  # stages keep their rows and their order
        return self.recorder(b) if self.recorder is not None else b

    def _run(self, b: Batch) -> Batch:
        for name, st in zip(self.names, self.stages, strict=True):
            size = self.stage_batch.get(name)
            b = st(b) if not size else concat_batches([st(part) for part in split_batch(b, size)])
        return b


class Recorder:
    """The end of a job's last group, where the rows are made: the task block's slim rows become manifest rows
    (run-level columns added), written as one part named by the block's place in the listing; the driver gets
    one summary row back -- counts, error tallies, stage times, the part's name and lineage's share -- never
    the rows. A retried block rewrites the same part."""

    def __init__(self, spec: EditSpec, ctx: StageContext):
        self.output = spec.output
        self.ctx = ctx

    def __call__(self, b: Batch) -> Batch:
        from promptpaint.lineage import Fingerprint, Sampler

        n = len(b["id"])
        counts: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        broken: dict[tuple[str, str], list[Any]] = {}
        stage_ms: Counter[str] = Counter()
        sampler, fingerprint, rows = Sampler(self.ctx.sample_k), Fingerprint(), []
        for i in range(n):
            row = {k: _py(v[i]) for k, v in b.items() if k not in CARRIED}
            counts[row["status"]] += 1
            if row["status"] == "skipped":  # already in the manifest from an earlier run
                continue
            if row["error_kind"]:
                errors[row["error_kind"]] += 1
                if row["error_kind"] in BREAKER_KINDS:
                    first = (row["error_message"].splitlines() or [""])[0][:300]
                    broken.setdefault((row["error_kind"], row["error_stage"]), [0, first])[0] += 1
            for s in TIMING_STAGES:
                stage_ms[s] += row.get(f"t_{s}_ms", 0.0)
            rows.append(manifest_row(row, self.ctx.run_cols))
            if self.ctx.fingerprint:
                fingerprint.add(rows[-1]["id"])
                sampler.offer(rows[-1])
        block = int(b["block"][0]) if n else 0
        part = manifest.write_part(self.output, manifest.part_name(self.ctx.run, block), rows) if rows else ""
        summary = {
            "block": block,
            "rows": n,
            "listed": int(max(b["listed"], default=0)),
            "last": bool(max(b.get("last", [0]), default=0)),
            "part": part,
            "counts": dict(counts),
            "errors": dict(errors),
            "broken": [[kind, stage, k, msg] for (kind, stage), (k, msg) in broken.items()],
            "stage_ms": dict(stage_ms),
            "fingerprint": fingerprint.hexdigest(),
            "ids": fingerprint.count,
            "samples": sampler.rows(),
        }
        return {"summary": [json.dumps(summary)]}


def task_blocks_of(b: Batch) -> list[Batch]:
    """A batch as the task blocks it holds, each processed on its own (Ray may hand several over at once).

    The Ray listing sends a task block as one descriptor row (``paths``, ``names``: lists); later groups get
    rows tagged with their ``block``; a batch without either (a test, serve) is one task block."""
    if "paths" in b:
        return [
            {
                "path": list(paths),
                "name": list(names),
                "block": [block] * len(paths),
                "listed": [listed] * len(paths),
                "last": [last] * len(paths),
            }
            for block, listed, last, paths, names in zip(
                b["block"], b["listed"], b["last"], b["paths"], b["names"], strict=True
            )
        ]
    if "block" not in b:
        return [b]
    cuts = [i for i in range(1, len(b["block"])) if b["block"][i] != b["block"][i - 1]]
    return [{k: v[i:j] for k, v in b.items()} for i, j in zip([0, *cuts], [*cuts, len(b["block"])], strict=True)]


def manifest_row(row: dict[str, Any], run_cols: dict[str, Any]) -> dict[str, Any]:
    """A slim row (the writer's output) as a manifest row: JSON columns decoded, run-level columns added."""
    out = {k: row[k] for k in row if k not in ("path", *JSON_COLUMNS)}
    out["input_path"] = row["path"]
    for c in JSON_COLUMNS:
        out[c] = json.loads(row[c])
    out.update(run_cols)
    return out


class RayChain(Chain):
    """A Chain in a Ray actor or task: records the node it runs on in every row it passes."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        import ray

        self.node = ray.get_runtime_context().get_node_id()


def run_task_group(batch: dict[str, Any], spec: EditSpec, stages: list[str], ctx: StageContext, block_rows: int) -> Any:
    """Stateless CPU stages (read, write) as Ray tasks: their constructors are trivial."""
    return Chain(spec, stages, ctx, handoff=True, block_rows=block_rows)(batch)


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


class JobFailed(RuntimeError):
    """The job stopped: too many rows failed in a model stage or in promptpaint's code (exit 1)."""


class RayJobError(RuntimeError):
    """A Ray task of the job failed. ``str()`` is the root cause; ``detail`` is Ray's whole message.

    Only text is kept: Ray's exception reaches the failed dataset's executor through its frames, and with it
    the actor pool and every CPU it reserved; while anything holds it (a notebook's sys.last_value, a log
    record) the next job in this process would wait for those CPUs forever.
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (``RayTaskError.cause``, ``__cause__``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def _stage_of(exc: BaseException) -> str | None:
    """The promptpaint stage module the exception went through last (``actors/inpainter.py`` -> inpainter)."""
    tb, stage = exc.__traceback__, None
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/promptpaint/actors/" in f:
            stage = f.rsplit("/", 1)[-1].removesuffix(".py")
        tb = tb.tb_next
    return stage


def ray_failure(exc: BaseException) -> RayJobError:
    root = root_cause(exc)
    stage = _stage_of(root)
    where = f" (in {stage})" if stage else ""
    message = f"{type(root).__name__}: {root}".strip().splitlines()[0][:500] + where
    return RayJobError(message, detail=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- preflight


def model_names(spec: EditSpec) -> dict[str, str]:
    """Stage -> registry name of its model, for the model stages this mode runs (validated by the spec)."""
    names = {"detect": spec.detect.model, "segment": spec.segment.model, "inpaint": spec.inpaint.model}
    names["score"] = spec.qc.model
    return {stage: names[stage] for stage in spec.stages() if stage in MODEL_STAGES}


def check_models(spec: EditSpec) -> dict[str, dict[str, str | None]]:
    """Fail before any work if a model cannot be found; what will be loaded from where, and its fingerprint."""
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
        out[stage] = {
            "name": name,
            "source": source,
            "revision": "local" if local else entry.revision,
            "weights": weights_fingerprint(name, spec.models_dir),
        }
    if "inpaint" in out and spec.inpaint.lora:
        out["inpaint"]["lora"] = json.dumps(lora_lineage(spec.inpaint.lora), sort_keys=True)
    return out


def lora_lineage(loras: list[Any]) -> list[dict[str, Any]]:
    """Per LoRA: path, content hash, scale and the training run it came from (manifest, PNG text, identity)."""
    from promptpaint.lora import inspect_lora

    return [inspect_lora(r.path).lineage(r.scale) for r in loras]


def local_shape() -> ClusterShape:
    """This machine, as the local Ray (or loop) will see it."""
    from promptpaint.jobs.ray_runtime import local_cpus, local_gpus

    return ClusterShape.single(local_cpus(), local_gpus())


@dataclass
class Prepared:
    spec: EditSpec  # with identity: its spec_hash covers weights and dtype
    plan: Plan
    models: dict[str, dict[str, str | None]]


def prepare(spec: EditSpec, shape: ClusterShape) -> Prepared:
    """Everything that can be wrong with a spec, found before any model work: SpecError (exit 2) or
    ModelNotAvailable (exit 1). The returned spec's hash covers the weights and the dtype."""
    the_plan = plan(spec, shape)  # fp16 on a CPU cluster, actors larger than any node
    models = check_models(spec)
    identity: dict[str, Any] = {"dtype": the_plan.dtype, "weights": {s: m["weights"] for s, m in models.items()}}
    if "lora" in models.get("inpaint", {}):  # the LoRAs' content, not only their paths, shapes the outputs
        identity["lora"] = [[x["sha256"], x["scale"]] for x in json.loads(models["inpaint"]["lora"])]
    return Prepared(spec.with_identity(identity), the_plan, models)


# ------------------------------------------------------------------------------------------------ driver


class _Consumer:
    """Driver side: fold each task block's summary into counts, stage times and lineage; show progress.

    Holds counts and part names only: the rows were written as manifest parts where they were made."""

    def __init__(self, spec: EditSpec, progress: bool, lineage: Lineage):
        self.spec = spec
        self.lineage = lineage
        self.blocks: set[int] = set()  # task blocks seen (by first row): a retried block is counted once
        self.parts: list[str] = []
        self.rows = 0
        self.listed = 0
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.broken: Counter[tuple[str, str]] = Counter()  # (kind, stage) of breaker-counted errors
        self.first_message: dict[tuple[str, str], str] = {}
        self.stage_ms: Counter[str] = Counter()
        self.bar = _progress_bar(progress)

    def consume(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for text in batch["summary"]:
            b = json.loads(text)
            if b["block"] in self.blocks:  # a retried task delivered this block twice: its part was rewritten
                continue
            self.blocks.add(b["block"])
            out.append(b)
            self.rows += b["rows"]
            self.listed = max(self.listed, b["listed"])
            if b["part"]:
                self.parts.append(b["part"])
            self.counts.update(b["counts"])
            self.errors.update(b["errors"])
            self.stage_ms.update(b["stage_ms"])
            for kind, stage, n, message in b["broken"]:
                self.broken[(kind, stage)] += n
                self.first_message.setdefault((kind, stage), message)
            self.lineage.fold(b["fingerprint"], b["ids"], b["samples"])
            if b["last"]:  # the listing has ended: from now on the bar knows its total
                self.bar.total = b["listed"]
            self.bar.update(b["rows"])
        return out

    @property
    def processed(self) -> int:
        return sum(n for status, n in self.counts.items() if status != "skipped")

    def check_breaker(self) -> None:
        """JobFailed when more than ``limits.max_error_rate`` of the processed rows broke in a stage."""
        lim = self.spec.limits
        processed = self.processed
        failed = sum(self.broken.values())
        if (
            lim.max_error_rate is None
            or processed < lim.error_rate_min_rows
            or failed <= lim.max_error_rate * processed
        ):
            return
        (kind, stage), n = self.broken.most_common(1)[0]
        raise JobFailed(
            f"stopped: {failed} of {processed} rows failed in a stage (limits.max_error_rate="
            f"{lim.max_error_rate:g}); most common: {kind} in stage {stage or '?'} ({n} rows): "
            f"{self.first_message[(kind, stage)]}"
        )

    def close(self) -> None:
        self.bar.close()


def _scalar(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, list | dict) else v


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _progress_bar(enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # No total while the listing streams (a count and a rate); the listing's last block brings it.
    return tqdm(total=None, unit="img", desc="promptpaint", disable=not enabled, file=sys.stderr)


def run_columns(spec: EditSpec, models: dict[str, Any], lineage: Lineage) -> dict[str, Any]:
    """Run-level manifest columns: the same for every row, added where the parts are written."""
    cols: dict[str, Any] = {
        "spec_hash": spec.spec_hash(),
        "experiment_key": lineage.key,
        "lineage_mode": lineage.mode,
        "lineage_artifact": lineage.artifact_note(),
    }
    for stage, info in models.items():
        cols.update({f"model.{stage}.{k}": v for k, v in info.items()})
    cols.update({f"spec.{k}": _scalar(v) for k, v in spec.flat().items()})
    return cols


# --------------------------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class Listing:
    """The inputs, streamed as task blocks: ``block`` (the place of its first row in the listing of pending
    inputs), ``path`` and ``name`` (bytes: a non-UTF-8 file name is not an Arrow string) and ``listed`` (inputs
    listed so far; on the last block, all of them). Runs in the driver (local executor) or in one Ray read
    task (Ray): the driver never holds the list of inputs. ``done_paths`` (``--incremental``) are left out,
    unread."""

    input: str
    plan: Plan
    done_paths: frozenset[str] = frozenset()

    def blocks(self) -> Iterator[dict[str, list[Any]]]:
        sizes = task_blocks(self.plan)
        want, seq, listed = next(sizes), 0, 0
        rows: list[tuple[str, str]] = []
        held: dict[str, list[Any]] | None = None  # one block held back: the last one learns the total
        for path, name in iter_inputs(self.input):
            listed += 1
            if path in self.done_paths:
                continue
            rows.append((path, name))
            if len(rows) == want:
                if held is not None:
                    yield held
                held = self._block(seq, rows, listed)
                seq, rows, want = seq + len(rows), [], next(sizes)
        if rows:
            if held is not None:
                yield held
            held = self._block(seq, rows, listed)
        if held is not None:
            held["listed"] = [listed] * len(held["block"])
            held["last"] = [1] * len(held["block"])
            yield held

    @staticmethod
    def _block(seq: int, rows: list[tuple[str, str]], listed: int) -> dict[str, list[Any]]:
        return {
            "block": [seq] * len(rows),
            "path": [os.fsencode(p) for p, _ in rows],
            "name": [os.fsencode(n) for _, n in rows],
            "listed": [listed] * len(rows),
            "last": [0] * len(rows),
        }


def _local_batches(spec: EditSpec, p: Plan, listing: Listing, ctx: StageContext) -> Iterable[Batch]:
    import torch

    before = torch.get_num_threads()
    chain = Chain(
        spec, p.stages, ctx, p.stage_batch, num_threads=p.threads if p.device == "cpu" else None,
        block_rows=p.block_rows,
    )  # fmt: skip
    try:
        for block in listing.blocks():
            yield chain(block)
    finally:
        torch.set_num_threads(before)  # the plan's thread count is the job's, not the caller's


def _listing_source(listing: Listing) -> Any:
    """A Ray Data datasource of one read task that runs the ``Listing`` and yields its task blocks as they are
    cut: the listing streams on a worker, behind Ray Data's backpressure, and the driver holds none of it.
    (Defined here: importing ray.data costs the local executor seconds.)"""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ListInputs(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Any = None, data_context: Any = None) -> Any:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda: _arrow_blocks(listing), meta)]

    return ListInputs()


def _arrow_blocks(listing: Listing) -> Iterator[Any]:
    """Each task block as one descriptor row (``paths``/``names`` lists): Ray Data merges small blocks a read
    task yields, so row boundaries are the only ones that survive to the ``repartition`` that follows."""
    import pyarrow as pa

    for b in listing.blocks():
        yield pa.table(
            {
                "block": pa.array(b["block"][:1], pa.int64()),
                "listed": pa.array(b["listed"][:1], pa.int64()),
                "last": pa.array(b["last"][:1], pa.int8()),
                "paths": pa.array([b["path"]], pa.list_(pa.binary())),
                "names": pa.array([b["name"]], pa.list_(pa.binary())),
            }
        )


def _one_row_blocks(ds: Any) -> Any:
    """``ds.repartition(target_num_rows_per_block=1, strict=True)``, but a 0-CPU task like the listing's: the
    public call's task asks for 1 CPU, which a CPU model actor holding every CPU of the node never frees
    (a silent deadlock on a 1-node CPU cluster). Ray Data's own logical operator, with our remote args."""
    from ray.data import Dataset
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    op = StreamingRepartition(
        target_num_rows_per_block=1,
        strict=True,
        input_dependencies=[ds._logical_plan.dag],
        ray_remote_args={"num_cpus": 0},
    )
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def _first_blocks(listing: Listing, p: Plan, most: int) -> int:
    """How many of the first ``most`` blocks the corpus fills (the listing's start only): a pool starts no more
    actors than there are blocks for them, and a tiny job does not load its models on every core."""
    rows = sum(1 for _ in itertools.islice(iter_inputs(listing.input), most * p.block_rows))
    return -(-rows // p.block_rows)


def _ray_batches(spec: EditSpec, p: Plan, listing: Listing, ctx: StageContext) -> Iterable[Any]:
    import ray

    blocks = _first_blocks(listing, p, max((g.pool_max for g in p.groups), default=1))

    # One Ray block = one task block, cut by the listing (whole blocks of block_rows rows, in listing order),
    # and every group splits it back into blocks as the local loop does: batch composition then never depends
    # on timing or on how Ray would split a list (batched CPU kernels' last bits, and so the output bytes,
    # depend on which rows share a call). num_cpus=0: listing is I/O, it must not wait for a CPU a model
    # actor holds, and it keeps the read from fusing into the next group (its CPUs differ). One read task
    # (override_num_blocks=1: else Ray Data splits its output to reach a read parallelism); then one descriptor
    # row, one task block, per Ray block.
    ds = _one_row_blocks(ray.data.read_datasource(_listing_source(listing), num_cpus=0, override_num_blocks=1))
    for g in p.groups:
        if g.uses_model:
            ds = ds.map_batches(
                RayChain,
                fn_constructor_kwargs={
                    "spec": spec,
                    "stages": list(g.stages),
                    "ctx": ctx,
                    "stage_batch": p.stage_batch,
                    "num_threads": g.threads,
                    "handoff": True,
                    "block_rows": p.block_rows,
                },
                compute=ray.data.ActorPoolStrategy(
                    min_size=g.pool_min,
                    max_size=g.pool_max,
                    # Start as many actors as there is work for: Ray Data grows a pool only under sustained load,
                    # and a short job on a fresh cluster would otherwise finish on one node.
                    initial_size=max(g.pool_min, min(g.pool_max, blocks)),
                    enable_true_multi_threading=True,
                ),
                batch_size=None,  # whole task blocks (see above)
                batch_format="numpy",
                num_cpus=g.num_cpus,
                num_gpus=g.num_gpus,
            )
        else:
            ds = ds.map_batches(
                run_task_group,
                fn_kwargs={"spec": spec, "stages": list(g.stages), "ctx": ctx, "block_rows": p.block_rows},
                batch_size=None,
                batch_format="numpy",
                num_cpus=g.num_cpus,
            )
    failure = None
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield as_lists(batch)
    except Exception as e:  # noqa: BLE001 - re-raised below as text (see RayJobError)
        failure = ray_failure(e)
    if failure is not None:
        raise failure


def describe_plan(spec: EditSpec, shape: ClusterShape | None = None) -> str:
    """``--dry-run``: what the job would do. Runs the same preflight as the job (exit 2 / 1 alike).

    Counts the inputs by streaming the listing (FileNotFoundError when there are none)."""
    shape = shape or local_shape()
    prep = prepare(spec, shape)
    state = manifest.load_state(spec.output)
    n, first = 0, []
    for path, _ in iter_inputs(spec.input):
        n += 1
        if n <= 10:
            first.append(path)
    lines = [
        f"inputs: {n} files matching {spec.input!r}",
        *[f"  {p}" for p in first],
        *([f"  ... and {n - 10} more"] if n > 10 else []),
        f"already in the manifest: {len(state.final)} finished (skipped after hashing their bytes), "
        f"{len(state.transient)} with transient errors (retried)",
        f"output: {spec.output}  (spec hash {prep.spec.spec_hash()}, names: {spec.write.naming}, "
        f"format: {spec.write.format})",
        f"executor: {spec.runtime.executor}; cluster: "
        + ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in shape.nodes),
        *format_plan(prep.plan),
    ]
    for stage, m in prep.models.items():
        lines.append(f"  model {stage}: {m['name']} from {m['source']} (revision {m['revision']}, {m['weights']})")
    calls = {s: -(-n // b) for s, b in prep.plan.stage_batch.items()}
    lines.append(
        "model calls (at most, before skipping done ids and images without detections): "
        + ", ".join(f"{s} {c} batches" for s, c in calls.items())
        + (f"; inpaint denoising steps per image: {spec.inpaint.steps}" if "inpaint" in calls else "")
    )
    if spec.mode_info.export:
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

    Inputs whose (id, path) the manifest holds with a final status are skipped after reading their bytes;
    inputs recorded with a transient error are retried, and their new row replaces the old one.
    ``incremental`` also skips input *paths* this spec finished, unread. ``on_batch`` sees each task block's
    summary (block, rows, listed, last, part, counts, ...) as it reaches the driver. Raises SpecError (bad spec, before any
    model work), FileNotFoundError (no inputs), JobFailed (error-rate breaker), RayJobError (a Ray task
    failed), ModelNotAvailable, LineageUnavailable.
    """
    t0 = time.perf_counter()
    # 1. Inputs, the cluster, the plan and the models: every spec problem surfaces here, before model work.
    next(iter_inputs(spec.input))  # FileNotFoundError now, not from inside a Ray task
    if spec.runtime.executor == "ray":
        from promptpaint.jobs.ray_runtime import cluster_shape, ensure_ray

        ensure_ray(spec.runtime.address)
        shape = cluster_shape()
    else:
        shape = local_shape()
    prep = prepare(spec, shape)
    spec, the_plan, models = prep.spec, prep.plan, prep.models
    # (id, path) pairs, not ids: an input whose bytes equal one recorded under another path still
    # needs its own manifest row.
    state = manifest.load_state(spec.output)
    done_paths: frozenset[str] = frozenset()
    if incremental:
        done_paths = frozenset(state.final_paths.get(spec.spec_hash(), ()))
        done = all_done(spec, state)
        if done is not None:  # a scheduled run with nothing new: no Comet experiment, no model
            return nothing_new(spec, done, t0)
    # Lineage opens before any model work: its key goes into every PNG and manifest row, and
    # lineage.require fails here, not after hours of GPU time.
    lineage = Lineage.start(spec, job_name(spec), spec_path, models)
    manifest.clear_success(spec.output)
    remove_temp_files(spec.output)  # a killed run's half-written files; no writer of ours runs yet
    ctx = StageContext(
        done_ids=frozenset(state.final),
        png_text={
            "promptpaint:spec_hash": spec.spec_hash(),
            "promptpaint:prompt": spec.inpaint.prompt,
            "promptpaint:negative_prompt": spec.inpaint.negative_prompt,
            "promptpaint:models": json.dumps(models, sort_keys=True),
            "promptpaint:experiment_key": lineage.key,
        },
        run=manifest.new_run(),
        run_cols=run_columns(spec, models, lineage),
        fingerprint=lineage.exp is not None,
        sample_k=lineage.sampler.k,
    )
    # 2. Stream task-block summaries in; the parts are already written.
    listing = Listing(spec.input, the_plan, done_paths)
    consumer = _Consumer(spec, progress, lineage)
    batches = _local_batches if spec.runtime.executor == "local" else _ray_batches
    try:
        for batch in batches(spec, the_plan, listing, ctx):
            for block in consumer.consume(batch):
                lineage.on_batch(running_stats(consumer.counts, consumer.errors, consumer.stage_ms, t0), consumer.rows)
                if on_batch is not None:
                    on_batch(block)
            consumer.check_breaker()
    except BaseException as e:
        consumer.close()
        lineage.abort(f"{type(e).__name__}: {e}")
        raise
    consumer.close()
    inputs = max(consumer.listed, consumer.rows)
    consumer.counts["skipped"] += inputs - consumer.rows  # --incremental: left out by the listing, unread
    # An input has one row per output: this run's replaces an earlier transient error (whose id may differ:
    # an unreadable file's id hashes its path) and, with names from the input path, an earlier spec's row
    # (its image file was just overwritten). This run's keys are read back from its parts, only when needed.
    stale = state.transient | (state.final if spec.write.naming == "input" else set())
    seen = manifest.read_keys(consumer.parts) if stale else set()
    done = {path for _, path in seen}
    replaced = {k for k in stale if k[1] in done} - seen
    replaced |= seen & state.transient
    superseded = manifest.supersede(spec.output, replaced, consumer.parts)
    export = None
    if spec.mode_info.export:  # from the whole manifest: earlier runs' rows count too
        export = coco.export(spec.output, spec.mode, spec.detect.texts, spec.input, spec.spec_hash())
    # 3. Summary, then _SUCCESS last.
    seconds = time.perf_counter() - t0
    processed = consumer.processed
    summary = {
        "inputs": inputs,
        "processed": processed,
        "counts": dict(consumer.counts),
        "errors": dict(consumer.errors),
        "retried": len({path for _, path in state.transient} & done),
        "superseded_rows": superseded,
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "stage_ms_per_image": {
            s: round(consumer.stage_ms[s] / max(processed, 1), 3) for s in TIMING_STAGES if s in spec.stages()
        },
        "spec_hash": spec.spec_hash(),
        "models": models,
        "plan": format_plan(the_plan),
        "nodes": len(shape.nodes),
        "manifest_rows_written": processed,
        "manifest_parts_written": len(consumer.parts),
        "mode": spec.mode,
    }
    if export is not None:
        summary["coco"] = export
    summary["lineage"] = lineage.finish(summary, sorted(consumer.parts), spec.to_yaml())
    manifest.write_success(spec.output, summary)
    return JobResult(spec.output, inputs, dict(summary["counts"]), dict(consumer.errors), seconds, summary)


def all_done(spec: EditSpec, state: manifest.ManifestState | None = None) -> int | None:
    """``--incremental`` with nothing to do: the number of inputs when every one has a final row under this
    spec's hash (``spec`` as ``prepare`` returns it: its hash covers the weights and dtype), else None.
    Streams the listing and stops at the first input still to do."""
    state = state if state is not None else manifest.load_state(spec.output)
    seen = state.final_paths.get(spec.spec_hash(), set())
    n = 0
    for path, _ in iter_inputs(spec.input):
        if path not in seen:
            return None
        n += 1
    return n


def nothing_new(spec: EditSpec, inputs: int, t0: float) -> JobResult:
    seconds = round(time.perf_counter() - t0, 3)
    summary = {"inputs": inputs, "processed": 0, "counts": {"skipped": inputs}, "errors": {}, "seconds": seconds,
               "images_per_second": 0.0, "stage_ms_per_image": {}, "spec_hash": spec.spec_hash(), "mode": spec.mode,
               "nothing_new": True}  # fmt: skip
    return JobResult(spec.output, inputs, {"skipped": inputs}, {}, seconds, summary)


def format_summary(result: JobResult) -> str:
    s = result.summary
    if s.get("nothing_new"):
        return (f"promptpaint: 0 new inputs ({s['inputs']} already done under spec {s['spec_hash']}) -> "
                f"{result.output}; nothing to do ({s['seconds']:.1f} s)")  # fmt: skip
    lines = [
        f"promptpaint: {s['inputs']} inputs -> {result.output}",
        f"  {'processed':<14}{s['processed']:>8}",
    ]
    from promptpaint.config import MODE_TABLE

    main = MODE_TABLE[s.get("mode", "edit")].done_status
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
