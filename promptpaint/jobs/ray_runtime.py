"""Connecting to Ray: a new local Ray on a laptop, the cluster named by the spec or ``RAY_ADDRESS`` elsewhere.

``ray.init()`` without an address joins the cluster recorded in Ray's session files on this machine, even
one that died: the job would then retry a dead address for minutes. So without an address we always start
a new local Ray (``address="local"``), and an address that is given is probed first and fails within
seconds, naming it.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

from promptpaint.jobs.plan import ClusterShape, NodeShape

PROBE_TIMEOUT_S = 5.0


class RayUnavailable(RuntimeError):
    """The Ray cluster named by the spec or RAY_ADDRESS does not answer (exit 1)."""


def resolve_address(address: str | None) -> str | None:
    """The address to join: the spec's, else ``RAY_ADDRESS``; None (or ``local``) = start a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """RayUnavailable unless ``host:port`` of ``address`` accepts a TCP connection within ``timeout`` s."""
    if address == "auto":
        return  # "the running cluster on this machine": Ray itself finds (or fails to find) it
    url = urlparse(address if "://" in address else f"gcs://{address}")
    if url.scheme in ("http", "https"):
        raise RayUnavailable(
            f"{address!r} is a dashboard / job-submission address; give the cluster's GCS address (host:6379) or "
            "ray://host:10001 to run here, or submit the job to the dashboard address"
        )
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise RayUnavailable(
            f"the Ray cluster at {address!r} does not answer ({host}:{port}: {e}). Start it, fix runtime.address / "
            "RAY_ADDRESS, or unset RAY_ADDRESS to run on a new local Ray"
        ) from None


def ensure_ray(address: str | None = None, verbose: bool = False) -> None:
    """Start (or join) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    target = resolve_address(address)
    if target is not None:
        probe(target)
    env = {} if verbose else {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    ray.init(
        address=target or "local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=verbose,  # workers' output goes to Ray's log files; the terminal shows the job's bar
        runtime_env={"env_vars": env} if env else None,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own bar over rows written
    ctx.print_on_execution_start = False


def cluster_shape() -> ClusterShape:
    """The alive nodes' CPUs and GPUs (per node: actors are sized by what one node holds)."""
    import ray

    nodes = tuple(
        NodeShape(float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
        for n in ray.nodes()
        if n.get("Alive")
    )
    return ClusterShape(nodes or (NodeShape(1.0),))


def local_cpus() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def local_gpus() -> float:
    import torch

    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
