"""What every model family provides (:class:`Family`), what loading returns, and the shared hub loaders.

A family module (``owl.py``, ``sam.py``, ...) builds one :class:`Family` per family key the registry uses;
``families.py`` collects them. Stages ask the family for their backend, so no stage if-chains on a family.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache

from promptpaint.models.registry import ModelEntry

if TYPE_CHECKING:
    from promptpaint.actors.prompts import InstancePrompt


class ModelNotAvailable(RuntimeError):
    """The weights for a registry entry could be found neither locally nor on (or cached from) the hub."""


@dataclass
class LoadedModel:
    entry: ModelEntry
    source: str  # local folder or hub id actually loaded
    revision: str | None  # resolved commit when known, else the requested revision, else "local"
    # (ultralytics assets: "<pinned release or CLIP commit>+sha256:<first 12 hex of the .pt loaded>")
    processor: Any  # transformers processor (detect/segment); UltralyticsParts; None for diffusers pipelines
    model: Any  # transformers model in eval mode, a diffusers pipeline, or an ultralytics model


# (entry, local folder or hub id, revision or None for local folders, dtype) -> (processor, model, commit or None)
Loader = Callable[[ModelEntry, str, str | None, torch.dtype], tuple[Any, Any, str | None]]
# (loaded model, device, dtype) -> the stage backend: a DetectBackend, SegmentBackend or ScoreBackend
BackendFactory = Callable[[LoadedModel, torch.device, torch.dtype], Any]


@dataclass(frozen=True)
class Family:
    """One model family: everything promptpaint does differently for it, in one object.

    ``load`` reads a local folder or a hub id with the family's own classes. ``probe_files`` are files whose
    presence in the HF cache counts as "this checkpoint is cached" (configs, not weights: weight file names vary
    between safetensors / bin / fp16 variants); empty when the weights are not on the hub (ultralytics assets are
    probed by file, see ``is_available``). ``build_tiny(entry)`` returns random-weight objects with
    ``save_pretrained(folder)``, built in a fixed order (build_tiny seeds once per entry, so the order fixes the
    weights). ``backend`` makes the stage callable (None for inpaint / generate: that stage drives the diffusers
    pipeline itself). ``defaults`` are the family-wide settings its loader and backend use.
    """

    name: str
    task: str
    load: Loader
    probe_files: tuple[str, ...]
    build_tiny: Callable[[ModelEntry], list[Any]]
    backend: BackendFactory | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- backends

# (boxes (N, 4) float32 xyxy px of the original image, scores (N,) float32, query index (N,) int64)
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]
# Per image: candidate masks (I, M, H, W) bool at the original size and their scores (I, M) float32,
# one row per instance prompt (in order), M candidates each (M = 1 when one mask is asked for).
Candidates = tuple[np.ndarray, np.ndarray]


class DetectBackend(Protocol):
    """One model family's detector: images x queries -> raw detections at or above ``threshold``."""

    def __call__(self, images: list[np.ndarray], queries: list[str], threshold: float) -> list[Detections]: ...


class SegmentBackend(Protocol):
    """One model family's prompted segmenter."""

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]: ...


class ScoreBackend(Protocol):
    """One model family's image-text scorer."""

    def __call__(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """images[k] (h, w, 3) uint8 against texts[k] -> (len(images),) float32 scores in [0, 100]."""
        ...


# ----------------------------------------------------------------------------------------------------- loaders


def hub_kwargs(revision: str | None) -> dict[str, Any]:
    # Local folders take no revision: passing one would be meaningless and confuses cache lookups.
    return {} if revision is None else {"revision": revision}


def transformers_loader(processor_cls: str, model_cls: str) -> Loader:
    """Loader for a transformers processor + model pair, named by class."""

    def load(entry: ModelEntry, source: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
        import transformers

        kw = hub_kwargs(revision)
        processor = getattr(transformers, processor_cls).from_pretrained(source, **kw)
        model = getattr(transformers, model_cls).from_pretrained(source, dtype=dtype, **kw)
        return processor, model, getattr(model.config, "_commit_hash", None)

    return load


def diffusers_loader(**extra: Any) -> Loader:
    """Loader for a diffusers pipeline whose class is named by the registry entry (``entry.pipeline``)."""

    def load(entry: ModelEntry, source: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
        import diffusers

        if not entry.pipeline:
            raise ValueError(f"registry entry {entry.name!r} names no diffusers pipeline class")
        cls = getattr(diffusers, entry.pipeline)
        _quiet_diffusers()
        # diffusers 0.42 deprecates torch_dtype= in favour of dtype=
        pipe = cls.from_pretrained(source, dtype=dtype, **extra, **hub_kwargs(revision))
        pipe.set_progress_bar_config(disable=True)
        return None, pipe, None

    return load


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers warns on every ``vae.to(dtype)`` that "modules should be kept in float32: []" -- an empty
    list, so nothing is at risk. SDXL inpainting casts its VAE that way on every call (``force_upcast``),
    which would print the warning once per batch for the whole job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_diffusers() -> None:
    log = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropEmptyFp32Warning) for f in log.filters):
        log.addFilter(_DropEmptyFp32Warning())


def cached_commit(hub_id: str, filename: str, revision: str | None) -> str | None:
    """Commit sha of the cached snapshot holding ``filename`` (``.../snapshots/<sha>/<filename>``)."""
    path = try_to_load_from_cache(hub_id, filename, revision=revision)
    if not isinstance(path, str):
        return None
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
