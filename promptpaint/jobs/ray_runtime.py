"""Connecting to Ray: a local cluster on a laptop, the cluster named by ``RAY_ADDRESS`` elsewhere."""

from __future__ import annotations

import logging
import os

from promptpaint.config import RuntimeSpec


def ensure_ray() -> None:
    """Start (or join) Ray once per process. ``ray.init`` itself honours ``RAY_ADDRESS``."""
    import ray

    if ray.is_initialized():
        return
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own bar over rows written
    ctx.print_on_execution_start = False


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def local_cpus() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def cluster_device(runtime: RuntimeSpec) -> str:
    """'cuda' when the spec asks for it or the cluster has GPUs (the driver itself may have none)."""
    import ray

    if runtime.device != "auto":
        return "cuda" if runtime.device.startswith("cuda") else runtime.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
