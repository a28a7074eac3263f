"""Models: the registry (names, hub ids, pinned revisions) and one module per model family.

``promptpaint.models.registry`` is pure data and must import without torch (``config.py`` validates model
names with it when a spec is parsed), and importing it runs this file first; so only the registry is imported
here, and every other name is imported from its module on first use (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from promptpaint.models.registry import (
    MODELS,
    TASKS,
    ULTRALYTICS_ASSETS,
    ULTRALYTICS_RELEASE,
    ModelEntry,
    check_task,
    get_entry,
    resolve_source,
    source_label,
)

if TYPE_CHECKING:
    from promptpaint.models.base import Family, LoadedModel, ModelNotAvailable
    from promptpaint.models.families import FAMILIES, build_tiny, is_available, load_model
    from promptpaint.models.fingerprint import weights_fingerprint
    from promptpaint.models.owl import owl_target_size
    from promptpaint.models.sd import pipeline_default_resolution, pipeline_size_multiple
    from promptpaint.models.ultralytics import (
        ULTRALYTICS_PREDICT_FILE,
        UltralyticsParts,
        import_ultralytics,
        ultralytics_asset_path,
    )

# name -> the module (under promptpaint.models) that defines it
_LAZY = {
    "Family": "base",
    "LoadedModel": "base",
    "ModelNotAvailable": "base",
    "FAMILIES": "families",
    "build_tiny": "families",
    "is_available": "families",
    "load_model": "families",
    "weights_fingerprint": "fingerprint",
    "owl_target_size": "owl",
    "pipeline_default_resolution": "sd",
    "pipeline_size_multiple": "sd",
    "ULTRALYTICS_PREDICT_FILE": "ultralytics",
    "UltralyticsParts": "ultralytics",
    "import_ultralytics": "ultralytics",
    "ultralytics_asset_path": "ultralytics",
}

__all__ = [
    "FAMILIES",
    "MODELS",
    "TASKS",
    "ULTRALYTICS_ASSETS",
    "ULTRALYTICS_PREDICT_FILE",
    "ULTRALYTICS_RELEASE",
    "Family",
    "LoadedModel",
    "ModelEntry",
    "ModelNotAvailable",
    "UltralyticsParts",
    "build_tiny",
    "check_task",
    "get_entry",
    "import_ultralytics",
    "is_available",
    "load_model",
    "owl_target_size",
    "pipeline_default_resolution",
    "pipeline_size_multiple",
    "resolve_source",
    "source_label",
    "ultralytics_asset_path",
    "weights_fingerprint",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
