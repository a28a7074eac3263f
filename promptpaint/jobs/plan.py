"""The job plan: which stages fuse, how many rows each model call takes, how many actors, what each asks for.

Pure: a function of the spec and the cluster's shape, no Ray. The local loop and the Ray executor run the
same plan, so a block of rows is split into the same model calls on a laptop and on a cluster (same spec,
same bytes).

- A *block* is the unit of model work: ``block_rows`` consecutive inputs of the sorted listing. It is the
  largest model batch of the mode; each stage splits the block into its own batch size, so
  ``batch_size.inpaint: 16`` runs 16 rows per inpaint call whatever the other stages use.
- A *task block* (one Ray block, one manifest part, one local-loop step) is a run of whole blocks:
  ``task_blocks`` gives their sizes, one block each at first (every actor gets work in a small job), then
  doubling up to ``part_rows``, so a large corpus moves through Ray and the driver in few, large blocks.
  Every process splits a task block back into blocks, so the model calls never depend on it.
- Per-actor resources come from what **one node** holds: on CPU the fused actor takes the CPUs of the
  smallest node (one actor per node, torch threads = its CPUs), never the cluster total.
- Pools autoscale from 1 actor to as many as the nodes hold (Ray Data ``concurrency=(min, max)``);
  ``runtime.pool_size`` pins a pool.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from promptpaint.config import EditSpec, SpecError

MODEL_STAGES = ("detect", "segment", "inpaint", "score")
# Read/write tasks: small, so two of them fit beside a model actor on a 2-core machine.
TASK_CPUS = 0.5
# Separate CPU pools (fuse: none / models on CPU) share a node; a fraction keeps two of them from waiting
# on each other forever on 2 cores.
SPLIT_POOL_CPUS = 0.5
GPU_ACTOR_CPUS = 1.0


@dataclass(frozen=True)
class NodeShape:
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster's nodes hold (alive nodes; the driver may run on one of them or none)."""

    nodes: tuple[NodeShape, ...]

    @classmethod
    def single(cls, cpus: float, gpus: float = 0.0) -> ClusterShape:
        return cls((NodeShape(cpus, gpus),))

    @property
    def total_cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def total_gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def device(self) -> str:
        return "cuda" if self.total_gpus > 0 else "cpu"

    def fits(self, cpus: float, gpus: float) -> int:
        """How many actors asking ``cpus`` CPUs and ``gpus`` GPUs the nodes hold at once."""
        total = 0
        for n in self.nodes:
            k = math.floor(n.cpus / cpus + 1e-9) if cpus > 0 else 10**6
            if gpus > 0:
                k = min(k, math.floor(n.gpus / gpus + 1e-9))
            total += k
        return total


@dataclass(frozen=True)
class GroupPlan:
    """Consecutive stages run back to back in one process: an actor pool (models) or CPU tasks."""

    stages: tuple[str, ...]
    pool_min: int
    pool_max: int
    num_cpus: float
    num_gpus: float
    threads: int = 1  # torch threads of an actor

    @property
    def uses_model(self) -> bool:
        return any(s in MODEL_STAGES for s in self.stages)


@dataclass(frozen=True)
class Plan:
    device: str  # "cpu" | "cuda": where the model stages run
    dtype: str  # resolved: float32 | float16 | bfloat16
    fuse: str  # resolved: all | models | none
    block_rows: int
    stage_batch: dict[str, int] = field(default_factory=dict)  # rows per call of each stage of the mode
    groups: tuple[GroupPlan, ...] = ()
    threads: int = 1  # torch threads wherever a model runs on CPU (the local loop too)
    part_rows: int = 256  # rows per task block at most (a multiple of block_rows): runtime.manifest_every

    @property
    def stages(self) -> list[str]:
        return [s for g in self.groups for s in g.stages]


def with_prompts(spec: EditSpec, stages: list[str]) -> list[str]:
    """``stages`` with ``prompts`` (sidecar SAM prompts) right before ``detect`` when segment.points_file is set.

    ``prompts`` is not in ``config.STAGES``: it always runs with ``detect``, in the same process.
    """
    if not spec.segment.points_file or "detect" not in stages or "prompts" in stages:
        return list(stages)
    k = stages.index("detect")
    return [*stages[:k], "prompts", *stages[k:]]


def job_device(spec: EditSpec, shape: ClusterShape) -> str:
    """'cuda' when the spec asks for it or the cluster has GPUs (the driver itself may have none)."""
    dev = spec.runtime.device
    if dev == "auto":
        return shape.device
    return "cuda" if dev.startswith("cuda") else dev


def plan(spec: EditSpec, shape: ClusterShape) -> Plan:
    """Fusion, batch sizes, pools and per-actor resources for ``spec`` on a cluster of ``shape``.

    Raises SpecError (exit 2) for a spec this cluster cannot run (fp16 on a CPU-only cluster, a pinned
    actor larger than every node).
    """
    rt = spec.runtime
    device = job_device(spec, shape)
    dtype = rt.resolve_dtype("cuda" if device == "cuda" else device)
    fuse = rt.fuse if rt.fuse != "auto" else ("all" if device == "cpu" else "models")
    stages = spec.stages()
    models = [s for s in stages if s in MODEL_STAGES]
    stage_batch = {s: rt.batch(s) for s in models}
    block_rows = max(stage_batch.values(), default=8)

    if fuse == "all":
        parts = [stages]
    elif fuse == "models":
        parts = [stages[:1], stages[1:-1], stages[-1:]]  # read | every model stage and mask ops | write
    else:
        parts = [[s] for s in stages]
    parts = [with_prompts(spec, p) for p in parts]
    model_parts = [p for p in parts if any(s in MODEL_STAGES for s in p)]

    # torch's CPU kernels reduce in an order that depends on the thread count, so every process that runs a
    # model on CPU uses the same count -- the CPUs of the smallest node -- whatever its share of the CPUs:
    # then fuse modes and executors write the same bytes. (On GPU the count only feeds the host side.)
    cpu_threads = max(1, int(min((n.cpus for n in shape.nodes if n.cpus >= 1), default=1)))
    if rt.num_cpus:
        cpu_threads = max(1, int(rt.num_cpus))
    groups = []
    for part in parts:
        part_models = [s for s in part if s in MODEL_STAGES]
        if not part_models:
            groups.append(GroupPlan(tuple(part), 0, 0, TASK_CPUS, 0.0))
            continue
        gpus = max(rt.num_gpus.get(s, 1.0 if device == "cuda" else 0.0) for s in part_models)
        cpus = rt.num_cpus or _actor_cpus(shape, device, single=len(parts) == 1)
        fit = shape.fits(cpus, gpus)
        if fit < 1:
            raise SpecError(
                f"invalid spec: an actor for stages {'+'.join(part)} asks for {cpus:g} CPU and {gpus:g} GPU, "
                f"more than any node holds ({_describe(shape)}); lower runtime.num_cpus / runtime.num_gpus"
            )
        pinned = [rt.pool_size[s] for s in part if s in rt.pool_size]
        if pinned:
            lo = hi = max(pinned)
        else:
            lo, hi = 1, max(1, fit // len(model_parts))
        threads = cpu_threads if device == "cpu" else max(1, int(cpus))
        groups.append(GroupPlan(tuple(part), lo, hi, cpus, gpus, threads))
    part_rows = block_rows * max(1, rt.manifest_every // block_rows)
    return Plan(device, dtype, fuse, block_rows, stage_batch, tuple(groups), cpu_threads, part_rows)


# Task blocks of one block each before the sizes start doubling: enough for every actor of a small job.
WARM_BLOCKS = 8


def task_blocks(p: Plan) -> Iterator[int]:
    """Rows of each task block, in listing order: ``WARM_BLOCKS`` of ``block_rows``, then doubling up to
    ``part_rows``. Depends on the spec only (not on the cluster), so a re-run cuts the same parts."""
    rows, k = p.block_rows, 0
    while True:
        yield rows
        k += 1
        if k >= WARM_BLOCKS:
            rows = min(rows * 2, p.part_rows)


def _actor_cpus(shape: ClusterShape, device: str, single: bool) -> float:
    """CPUs of one model actor when the spec does not say.

    CPU, one fused pool: every CPU of the smallest node (torch threads = CPUs, one actor per node, as
    measured fastest on 2 cores). CPU, several pools: a fraction each. GPU: one CPU beside its GPU.
    """
    if device != "cpu":
        return GPU_ACTOR_CPUS
    if not single:
        return SPLIT_POOL_CPUS
    with_cpus = [n.cpus for n in shape.nodes if n.cpus >= 1]
    return float(min(with_cpus)) if with_cpus else SPLIT_POOL_CPUS


def _describe(shape: ClusterShape) -> str:
    return ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in shape.nodes) or "no nodes"


def format_plan(p: Plan) -> list[str]:
    """Human lines for ``--dry-run`` and the log."""
    lines = [
        f"device {p.device} ({p.dtype}), fuse {p.fuse}, {p.block_rows} rows per block, up to {p.part_rows} per task "
        "block and manifest part; rows per model call: " + ", ".join(f"{s} {b}" for s, b in p.stage_batch.items())
    ]
    for g in p.groups:
        if g.uses_model:
            pool = f"{g.pool_min}" if g.pool_min == g.pool_max else f"{g.pool_min}..{g.pool_max} (autoscaling)"
            lines.append(
                f"  actors {'+'.join(g.stages)}: pool {pool}, {g.num_cpus:g} CPU ({g.threads} torch threads), "
                f"{g.num_gpus:g} GPU each"
            )
        else:
            lines.append(f"  tasks  {'+'.join(g.stages)}: {g.num_cpus:g} CPU each")
    return lines
