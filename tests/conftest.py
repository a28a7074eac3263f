"""Shared fixtures: offline environment, one tiny model set, one local Ray per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports transformers/diffusers/ultralytics/comet: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "promptpaint-yolo"))
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("PROMPTPAINT_MODELS_DIR", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model set, built once and loaded through the real from_pretrained path."""
    from promptpaint.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny-models")
    build_tiny(folder)
    return folder


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
