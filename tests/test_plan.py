"""The job plan (``promptpaint.jobs.plan``): pure, no Ray. Fusion, pools, per-actor resources, dtype, batches."""

from __future__ import annotations

from typing import Any

import pytest

from promptpaint.config import EditSpec, SpecError, build_spec
from promptpaint.jobs.plan import ClusterShape, NodeShape, Plan, plan

ALL_EDIT = ("read", "detect", "segment", "mask", "inpaint", "write")


def spec(**sections: Any) -> EditSpec:
    return build_spec(EditSpec, {"input": "in", "output": "out", **sections})


def nodes(n: int, cpus: float, gpus: float = 0.0) -> ClusterShape:
    return ClusterShape(tuple(NodeShape(cpus, gpus) for _ in range(n)))


def model_groups(p: Plan) -> list:
    return [g for g in p.groups if g.uses_model]


def test_cpu_cluster_fuses_everything_and_sizes_the_actor_by_one_node():
    p = plan(spec(), nodes(4, 16))
    assert (p.device, p.dtype, p.fuse) == ("cpu", "float32", "all")
    (g,) = p.groups
    assert g.stages == ALL_EDIT
    assert g.num_cpus == 16  # one node's CPUs, not the cluster's 64
    assert g.num_gpus == 0
    assert (g.pool_min, g.pool_max) == (1, 4)  # one actor per node, autoscaling
    assert g.threads == 16


def test_small_cpu_nodes_one_actor_each():
    (g,) = plan(spec(), nodes(3, 2)).groups
    assert (g.pool_min, g.pool_max, g.num_cpus, g.threads) == (1, 3, 2, 2)


def test_single_two_cpu_node_has_one_actor():
    (g,) = plan(spec(), ClusterShape.single(2)).groups
    assert (g.pool_min, g.pool_max, g.num_cpus) == (1, 1, 2)


def test_smallest_node_sizes_the_cpu_actor():
    (g,) = plan(spec(), ClusterShape((NodeShape(16), NodeShape(4)))).groups
    assert g.num_cpus == 4
    assert (g.pool_min, g.pool_max) == (1, 4 + 1)  # 16 // 4 actors on the big node, one on the small


@pytest.mark.parametrize("qc", [False, True])
def test_pool_size_pins_the_group_holding_the_stage(qc: bool):
    p = plan(spec(runtime={"pool_size": {"inpaint": 3}}, qc={"enabled": qc}), nodes(4, 16))
    (g,) = p.groups
    if qc:
        assert [s for s in g.stages if s in ("detect", "segment", "inpaint", "score")][-1] == "score"
    assert (g.pool_min, g.pool_max) == (3, 3)


def test_pool_size_pins_with_qc_on_gpu():
    p = plan(spec(runtime={"pool_size": {"inpaint": 3}}, qc={"enabled": True}), nodes(2, 8, 4))
    (g,) = model_groups(p)
    assert g.stages[-1] == "score"
    assert (g.pool_min, g.pool_max) == (3, 3)


def test_gpu_cluster_fuses_models_between_read_and_write_tasks():
    p = plan(spec(), nodes(2, 8, 4))
    assert (p.device, p.dtype, p.fuse) == ("cuda", "float16", "models")
    read, models, write = p.groups
    assert read.stages == ("read",) and not read.uses_model and read.num_gpus == 0
    assert write.stages == ("write",) and not write.uses_model and write.num_gpus == 0
    assert models.stages == ("detect", "segment", "mask", "inpaint")
    assert models.num_gpus == 1
    assert (models.pool_min, models.pool_max) == (1, 8)  # 4 GPUs x 2 nodes
    assert models.num_cpus <= 8


def test_gpu_actors_limited_by_cpus_when_pinned():
    # 3 CPUs per actor: 2 fit on an 8-CPU node though it has 4 GPUs.
    p = plan(spec(runtime={"num_cpus": 3}), nodes(2, 8, 4))
    (g,) = model_groups(p)
    assert (g.num_cpus, g.pool_max) == (3, 4)


def test_stage_batches_and_block_rows():
    p = plan(spec(runtime={"batch_size": {"inpaint": 16, "detect": 4}}), nodes(1, 2))
    assert p.stage_batch["inpaint"] == 16
    assert p.stage_batch["detect"] == 4
    assert p.stage_batch["segment"] == 8  # default
    assert p.block_rows == 16  # the largest model batch, not capped to 8


def test_block_rows_default_is_eight():
    p = plan(spec(), nodes(1, 2))
    assert p.stage_batch == {"detect": 8, "segment": 8, "inpaint": 8}
    assert p.block_rows == 8


def test_fuse_none_on_cpu_gives_fractional_pools():
    p = plan(spec(runtime={"fuse": "none"}), nodes(1, 16))
    assert [g.stages for g in p.groups] == [(s,) for s in ALL_EDIT]
    models = model_groups(p)
    assert [g.stages[0] for g in models] == ["detect", "segment", "inpaint"]
    assert all(g.num_cpus == 0.5 and g.num_gpus == 0 for g in models)
    assert all(g.pool_max == 32 // 3 for g in models)

    small = plan(spec(runtime={"fuse": "none"}), ClusterShape.single(2))
    models = model_groups(small)
    assert len(models) == 3
    assert all(g.num_cpus == 0.5 and (g.pool_min, g.pool_max) == (1, 1) for g in models)


def test_fuse_models_on_cpu_one_model_pool():
    p = plan(spec(runtime={"fuse": "models"}), ClusterShape.single(2))
    assert p.fuse == "models" and p.device == "cpu"
    assert [g.stages for g in p.groups] == [("read",), ("detect", "segment", "mask", "inpaint"), ("write",)]


def test_fp16_on_a_cpu_only_cluster_is_a_spec_error():
    s = spec(runtime={"dtype": "float16"})  # fine to build: device auto may find a GPU
    with pytest.raises(SpecError, match="float16"):
        plan(s, nodes(3, 16))
    assert plan(s, nodes(1, 8, 1)).dtype == "float16"


def test_cpu_device_with_fp16_fails_at_build_spec():
    with pytest.raises(SpecError, match=r"runtime.*float16"):
        spec(runtime={"device": "cpu", "dtype": "float16"})


def test_device_cpu_on_a_gpu_cluster_plans_cpu():
    p = plan(spec(runtime={"device": "cpu"}), nodes(2, 8, 4))
    assert (p.device, p.dtype, p.fuse) == ("cpu", "float32", "all")
    assert p.groups[0].num_gpus == 0


def test_actor_larger_than_every_node_is_a_spec_error_naming_the_shape():
    with pytest.raises(SpecError) as e:
        plan(spec(runtime={"num_cpus": 32}), nodes(2, 16))
    msg = str(e.value)
    assert "32" in msg and "16 CPU" in msg and "runtime.num_cpus" in msg


@pytest.mark.parametrize(
    ("section", "key", "name"),
    [
        ("segment", "segment.model", "owlv2"),  # a detect model
        ("qc", "qc.model", "sam"),  # a segment model
        ("detect", "detect.model", "sam"),
        ("inpaint", "inpaint.model", "owlv2"),
        ("detect", "detect.model", "no-such-model"),
    ],
)
def test_unknown_or_wrong_task_model_is_a_spec_error_naming_the_key(section: str, key: str, name: str):
    with pytest.raises(SpecError) as e:
        spec(**{section: {"model": name}})
    assert key in str(e.value)
    assert name in str(e.value)
