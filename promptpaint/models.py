"""Model registry and loaders.

Every model promptpaint runs is a :class:`ModelEntry` in :data:`MODELS`. Loading goes through one
``from_pretrained`` path whether the source is a local folder (``<models_dir>/<name>``) or a hub id, so the
random-weight test set built by :func:`promptpaint.tiny.build_tiny` exercises exactly the code that loads
real checkpoints.

Per-family behaviour lives in small dicts (``_LOADERS``, ``_PROBE_FILES``, ``_TARGET_SIZE`` here,
``_BUILDERS`` in ``tiny.py``); adding a model is one registry entry, adding a family is one function per dict.

This module reads no environment variables itself (``config.py`` resolves ``PROMPTPAINT_MODELS_DIR``);
``HF_HUB_OFFLINE`` is honoured by huggingface_hub / transformers / diffusers, ``YOLO_OFFLINE`` by ultralytics
(the ultralytics families load through ultralytics' own classes; see :func:`import_ultralytics` for the one
environment side effect of ultralytics that is undone here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError

__all__ = [
    "MODELS",
    "LoadedModel",
    "ModelEntry",
    "ModelNotAvailable",
    "UltralyticsParts",
    "get_entry",
    "import_ultralytics",
    "is_available",
    "load_model",
    "owl_target_size",
    "pipeline_default_resolution",
    "resolve_source",
    "source_label",
    "ultralytics_asset_path",
]


class ModelNotAvailable(RuntimeError):
    """The weights for a registry entry could be found neither locally nor on (or cached from) the hub."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # registry key
    task: str  # one of TASKS
    family: str  # selects loader / builder / stage backend: "owlv2" | "owlvit" | "sam" | "sd-inpaint" | ...
    hub_id: str
    revision: str | None  # pinned hub commit; ignored for local folders
    default_resolution: int | None  # inpaint / generate: the checkpoint's native square side
    description: str
    pipeline: str | None = None  # diffusers pipeline class (diffusers families): the stage never if-chains on it
    asset: str | None = None  # ultralytics families: the .pt file released on github.com/ultralytics/assets
    asset_release: str | None = None  # ... and the release it is pinned to


@dataclass
class LoadedModel:
    entry: ModelEntry
    source: str  # local folder or hub id actually loaded
    revision: str | None  # resolved commit when known, else the requested revision, else "local"
    # (ultralytics assets: "<pinned release or CLIP commit>+sha256:<first 12 hex of the .pt loaded>")
    processor: Any  # transformers processor (detect/segment); UltralyticsParts; None for diffusers pipelines
    model: Any  # transformers model in eval mode, a diffusers pipeline, or an ultralytics model


# Ultralytics weights are release assets of this GitHub repo, not hub repos; v8.4.0 is the release ultralytics
# 8.4.x itself downloads them from (attempt_download_asset's default).
ULTRALYTICS_ASSETS = "ultralytics/assets"
ULTRALYTICS_RELEASE = "v8.4.0"

# Revisions are the hub commits pinned by several independent public projects (found via code search);
# bump them deliberately, together with a run against the real checkpoints.
MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="owlv2",
            task="detect",
            family="owlv2",
            hub_id="google/owlv2-base-patch16-ensemble",
            revision="cfd3195ba4ea9592eec887ded089f4c08eff231d",
            default_resolution=None,
            description="OWLv2 ViT-B/16 open-vocabulary detector (960 px, pads to square)",
        ),
        ModelEntry(
            name="owlvit",
            task="detect",
            family="owlvit",
            hub_id="google/owlvit-base-patch32",
            revision="cbc355fb364588351c5d51c7f74465e8e7ec6f72",
            default_resolution=None,
            description="OWL-ViT ViT-B/32 open-vocabulary detector (768 px, stretches to square)",
        ),
        ModelEntry(
            name="sam",
            task="segment",
            family="sam",
            hub_id="facebook/sam-vit-base",
            revision="70c1a07f894ebb5b307fd9eaaee97b9dfc16068f",
            default_resolution=None,
            description="Segment Anything ViT-B, box/point prompted masks (1024 px longest edge)",
        ),
        ModelEntry(
            name="yolo-world",
            task="detect",
            family="yolo-world",
            # Its class text encoder: CLIP ViT-B/32, the text weights ultralytics' own `clip:ViT-B/32` loads.
            hub_id="openai/clip-vit-base-patch32",
            revision="3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
            default_resolution=None,
            description="YOLO-World v2 S open-vocabulary detector (640 px letterbox), CLIP ViT-B/32 text features",
            asset="yolov8s-worldv2.pt",
            asset_release=ULTRALYTICS_RELEASE,
        ),
        ModelEntry(
            name="mobile-sam",
            task="segment",
            family="ultralytics-sam",
            hub_id=ULTRALYTICS_ASSETS,
            revision=ULTRALYTICS_RELEASE,  # a release tag: the assets repo has no per-file commits
            default_resolution=None,
            description="MobileSAM (TinyViT encoder, SAM decoder), box/point prompted masks (1024 px letterbox)",
            asset="mobile_sam.pt",
            asset_release=ULTRALYTICS_RELEASE,
        ),
        ModelEntry(
            name="fastsam",
            task="segment",
            family="fastsam",
            hub_id=ULTRALYTICS_ASSETS,
            revision=ULTRALYTICS_RELEASE,
            default_resolution=None,
            description="FastSAM-s: YOLOv8-seg masks of everything, prompts select among them (1024 px letterbox)",
            asset="FastSAM-s.pt",
            asset_release=ULTRALYTICS_RELEASE,
        ),
        ModelEntry(
            name="sd15-inpaint",
            task="inpaint",
            family="sd-inpaint",
            hub_id="stable-diffusion-v1-5/stable-diffusion-inpainting",
            revision="8a4288a76071f7280aedbdb3253bdb9e9d5d84bb",
            default_resolution=512,
            description="Stable Diffusion 1.5 inpainting (9-channel UNet), 512 px",
            pipeline="StableDiffusionInpaintPipeline",
        ),
        ModelEntry(
            name="sd2-inpaint",
            task="inpaint",
            family="sd-inpaint",
            hub_id="stabilityai/stable-diffusion-2-inpainting",
            revision="81a84f49b15956b60b4272a405ad3daef3da4590",
            default_resolution=512,
            description="Stable Diffusion 2 inpainting (9-channel UNet, OpenCLIP text encoder), 512 px",
            pipeline="StableDiffusionInpaintPipeline",
        ),
        ModelEntry(
            name="sdxl-inpaint",
            task="inpaint",
            family="sdxl-inpaint",
            hub_id="diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
            revision="115134f363124c53c7d878647567d04daf26e41e",
            default_resolution=1024,
            description="SDXL 1.0 inpainting 0.1 (9-channel UNet, two text encoders), 1024 px",
            pipeline="StableDiffusionXLInpaintPipeline",
        ),
        ModelEntry(
            name="sd15",
            task="generate",
            family="sd",
            hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
            default_resolution=512,
            description="Stable Diffusion 1.5 text-to-image, 512 px",
            pipeline="StableDiffusionPipeline",
        ),
        ModelEntry(
            name="sdxl",
            task="generate",
            family="sdxl",
            hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            revision="462165984030d82259a11f4367a4eed129e94a7b",
            default_resolution=1024,
            description="SDXL 1.0 base text-to-image (two text encoders), 1024 px",
            pipeline="StableDiffusionXLPipeline",
        ),
        ModelEntry(
            name="clip",
            task="score",
            family="clip",
            hub_id="openai/clip-vit-base-patch32",
            revision="3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
            default_resolution=None,
            description="CLIP ViT-B/32 image-text similarity for QC scoring (224 px centre crop, 77 tokens)",
        ),
    )
}


def get_entry(name: str) -> ModelEntry:
    """Registry lookup; an unknown name is a ValueError that lists the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def resolve_source(name: str, models_dir: str | None) -> tuple[str, bool]:
    """Return ``(models_dir/name, True)`` if that folder exists, else ``(hub_id, False)``."""
    entry = get_entry(name)
    if models_dir is not None:
        local = Path(models_dir) / name
        if local.is_dir():
            return str(local), True
    return entry.hub_id, False


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

# (processor, model, commit-or-None); ``revision`` is None for local folders.
Loader = Callable[[str, str | None, torch.dtype], tuple[Any, Any, str | None]]


def _hub_kwargs(revision: str | None) -> dict[str, Any]:
    # Local folders take no revision: passing one would be meaningless and confuses cache lookups.
    return {} if revision is None else {"revision": revision}


def _transformers_loader(processor_cls: str, model_cls: str) -> Loader:
    def load(source: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
        import transformers

        kw = _hub_kwargs(revision)
        processor = getattr(transformers, processor_cls).from_pretrained(source, **kw)
        model = getattr(transformers, model_cls).from_pretrained(source, dtype=dtype, **kw)
        return processor, model, getattr(model.config, "_commit_hash", None)

    return load


def _diffusers_loader(**extra: Any) -> Callable[[ModelEntry], Loader]:
    """Loader for a diffusers pipeline whose class is named by the registry entry (``entry.pipeline``)."""

    def for_entry(entry: ModelEntry) -> Loader:
        def load(source: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
            import diffusers

            if not entry.pipeline:
                raise ValueError(f"registry entry {entry.name!r} names no diffusers pipeline class")
            cls = getattr(diffusers, entry.pipeline)
            _quiet_diffusers()
            # diffusers 0.42 deprecates torch_dtype= in favour of dtype=
            pipe = cls.from_pretrained(source, dtype=dtype, **extra, **_hub_kwargs(revision))
            pipe.set_progress_bar_config(disable=True)
            return None, pipe, None

        return load

    return for_entry


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


def _fixed(loader: Loader) -> Callable[[ModelEntry], Loader]:
    return lambda entry: loader


# --------------------------------------------------------------------------------------------------------
# Ultralytics families: YOLO-World (detect), MobileSAM and FastSAM (segment)
# --------------------------------------------------------------------------------------------------------
# A local folder ``<models_dir>/<name>/`` holds exactly one ``*.pt`` ultralytics checkpoint (the real asset file
# can be copied in as is), YOLO-World also ``text_encoder/`` (a transformers CLIP text tower + tokenizer), and
# optionally ULTRALYTICS_PREDICT_FILE. Without a local folder the asset is taken from where ultralytics itself
# looks (working directory, then its weights dir), and downloaded by ultralytics only when it is online
# (YOLO_OFFLINE unset); offline, a missing asset fails at once instead of in ultralytics' download retries.

ULTRALYTICS_PREDICT_FILE = "ultralytics_predict.json"  # {"imgsz": N}: the square side to predict at
# Square side each family's predictor letterboxes to: the resolution the real checkpoints were trained at.
ULTRALYTICS_IMGSZ = {"yolo-world": 640, "ultralytics-sam": 1024, "fastsam": 1024}


@dataclass
class UltralyticsParts:
    """``LoadedModel.processor`` of the ultralytics families: what a stage needs besides the ultralytics model.

    ``weights``: the .pt file loaded; ``imgsz``: square side the predictor letterboxes to; ``tokenizer`` /
    ``text_model``: YOLO-World's CLIP text tower (transformers ``CLIPTokenizer`` /
    ``CLIPTextModelWithProjection``, on the CPU until the stage moves it), None for the segmenters.
    """

    weights: str
    imgsz: int
    tokenizer: Any = None
    text_model: Any = None


def import_ultralytics() -> Any:
    """Import ultralytics without its process-wide side effects. Our code imports ultralytics only after calling this.

    - When OMP_NUM_THREADS is unset it sets it to 1 (a training default), which every process started
      afterwards (Ray workers) would inherit: removed again.
    - It replaces ``PIL.Image.open`` with a wrapper that, on the first file Pillow cannot identify, runs
      ``check_requirements("pi-heif")`` -- a ``pip install`` at job time when online, a ModuleNotFoundError
      offline -- so every undecodable input of the job would change its error (or the environment):
      ``PIL.Image.open`` is put back. We hand ultralytics decoded arrays, never files.
    - ``check_requirements`` auto-installs missing packages: switched off (``AUTOINSTALL``), a worker must not
      pip-install anything.
    """
    if "ultralytics" in sys.modules and getattr(sys.modules["ultralytics"], "_promptpaint_calmed", False):
        return sys.modules["ultralytics"]
    ours = "OMP_NUM_THREADS" not in os.environ
    import PIL.Image
    import ultralytics
    import ultralytics.utils.checks as checks
    import ultralytics.utils.patches as patches

    if ours:
        os.environ.pop("OMP_NUM_THREADS", None)
    PIL.Image.open = patches._image_open  # the original, which ultralytics saved before patching
    checks.AUTOINSTALL = False
    ultralytics._promptpaint_calmed = True
    return ultralytics


def ultralytics_asset_path(asset: str) -> Path | None:
    """Where ultralytics would find ``asset`` without downloading: the working directory, then its weights dir."""
    import_ultralytics()
    from ultralytics.utils import SETTINGS

    for path in (Path(asset), Path(SETTINGS["weights_dir"]) / asset):
        if path.is_file():
            return path.resolve()
    return None


def _ultralytics_fix(entry: ModelEntry) -> str:
    """How to make an ultralytics asset available (for ModelNotAvailable)."""
    import_ultralytics()
    from ultralytics.utils import SETTINGS

    fix = (
        f"put {entry.asset} ({ULTRALYTICS_ASSETS} release {entry.asset_release}) into the working directory or "
        f"ultralytics' weights dir {SETTINGS['weights_dir']}, or unset YOLO_OFFLINE so ultralytics downloads it"
    )
    if entry.hub_id != ULTRALYTICS_ASSETS:
        fix += f" (and have {entry.hub_id} in the HF cache or the hub reachable)"
    return fix


def _fetch_asset(asset: str, release: str) -> Path:
    """The asset file: found locally, else downloaded by ultralytics from ``release`` when it is online."""
    import_ultralytics()
    from ultralytics.utils import ONLINE, SETTINGS
    from ultralytics.utils.downloads import attempt_download_asset

    found = ultralytics_asset_path(asset)
    if found is not None:
        return found
    weights_dir = Path(SETTINGS["weights_dir"])
    if not ONLINE:  # YOLO_OFFLINE=1 (or no DNS) at ultralytics import
        raise FileNotFoundError(f"{asset} is in neither {Path.cwd()} nor {weights_dir} and ultralytics is offline")
    path = Path(attempt_download_asset(weights_dir / asset, release=release))
    if not path.is_file():
        raise FileNotFoundError(f"ultralytics could not download {asset} ({ULTRALYTICS_ASSETS} {release})")
    return path


def _local_checkpoint(folder: Path, entry: ModelEntry) -> Path:
    pts = sorted(folder.glob("*.pt"))
    if len(pts) != 1:
        found = [p.name for p in pts] or "none"
        raise FileNotFoundError(f"{folder} must hold exactly one .pt checkpoint (e.g. {entry.asset}); found {found}")
    return pts[0]


def _sha256_prefix(path: Path, n: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:n]


def _ultralytics_loader(model_cls: str, text_tower: bool = False) -> Callable[[ModelEntry], Loader]:
    """Loader through ultralytics' own class (``YOLOWorld`` / ``SAM`` / ``FastSAM``), the same for local and real.

    Returns (UltralyticsParts, ultralytics model, revision). The revision of a non-local load is
    ``<pinned revision>+sha256:<first 12 hex of the .pt file>``: the release (or, for YOLO-World, the resolved
    CLIP commit) and the hash of the file actually loaded, which may come from the working directory.
    """

    def for_entry(entry: ModelEntry) -> Loader:
        asset, release = entry.asset, entry.asset_release
        if asset is None or release is None:
            raise ValueError(f"registry entry {entry.name!r} of ultralytics family {entry.family!r} names no asset")

        def load(source: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
            ultralytics = import_ultralytics()
            folder = Path(source)
            local = folder.is_dir()
            weights = _local_checkpoint(folder, entry) if local else _fetch_asset(asset, release)
            settings_file = folder / ULTRALYTICS_PREDICT_FILE
            settings = json.loads(settings_file.read_text()) if local and settings_file.is_file() else {}
            parts = UltralyticsParts(str(weights), int(settings.get("imgsz", ULTRALYTICS_IMGSZ[entry.family])))
            pinned = entry.revision
            if text_tower:
                from transformers import CLIPTextModelWithProjection, CLIPTokenizer

                text_source = str(folder / "text_encoder") if local else entry.hub_id
                kw = _hub_kwargs(revision)
                parts.tokenizer = CLIPTokenizer.from_pretrained(text_source, **kw)
                parts.text_model = CLIPTextModelWithProjection.from_pretrained(text_source, dtype=dtype, **kw).eval()
                pinned = getattr(parts.text_model.config, "_commit_hash", None) or pinned
            model = getattr(ultralytics, model_cls)(str(weights))
            return parts, model, None if local else f"{pinned}+sha256:{_sha256_prefix(weights)}"

        return load

    return for_entry


# family -> (registry entry -> loader). Most families ignore the entry; diffusers ones read its pipeline class.
_LOADERS: dict[str, Callable[[ModelEntry], Loader]] = {
    "owlv2": _fixed(_transformers_loader("Owlv2Processor", "Owlv2ForObjectDetection")),
    "owlvit": _fixed(_transformers_loader("OwlViTProcessor", "OwlViTForObjectDetection")),
    "sam": _fixed(_transformers_loader("SamProcessor", "SamModel")),
    "yolo-world": _ultralytics_loader("YOLOWorld", text_tower=True),
    "ultralytics-sam": _ultralytics_loader("SAM"),
    "fastsam": _ultralytics_loader("FastSAM"),
    # Bulk editing of user images: no safety checker (it also doubles memory).
    "sd-inpaint": _diffusers_loader(safety_checker=None, requires_safety_checker=False),
    "sd": _diffusers_loader(safety_checker=None, requires_safety_checker=False),
    # SDXL has no safety checker. Its invisible watermark is applied only when the optional package happens
    # to be installed; switching it off makes outputs independent of the environment.
    "sdxl-inpaint": _diffusers_loader(add_watermarker=False),
    "sdxl": _diffusers_loader(add_watermarker=False),
    "clip": _fixed(_transformers_loader("CLIPProcessor", "CLIPModel")),
}

# Files whose presence in the HF cache counts as "this checkpoint is cached" (configs, not weights:
# weight file names vary between safetensors / bin / fp16 variants).
_PROBE_FILES: dict[str, tuple[str, ...]] = {
    "owlv2": ("config.json", "preprocessor_config.json"),
    "owlvit": ("config.json", "preprocessor_config.json"),
    "sam": ("config.json", "preprocessor_config.json"),
    # Ultralytics families: the asset file is probed too (is_available); these are the hub part, if any.
    "yolo-world": ("config.json", "tokenizer_config.json"),
    "sd-inpaint": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"),
    "sd": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"),
    "sdxl-inpaint": (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
    ),
    "sdxl": (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
    ),
    "clip": ("config.json", "preprocessor_config.json"),
}


def _not_available(
    entry: ModelEntry, models_dir: str | None, is_local: bool, cause: BaseException
) -> ModelNotAvailable:
    looked = str(Path(models_dir) / entry.name) if models_dir is not None else "<no models_dir set>"
    first_line = (str(cause).splitlines() or [""])[0][:300]
    if entry.asset is None:
        hub = f"on the hub for {entry.hub_id}@{entry.revision or 'main'}"
    else:
        hub = f"for {source_label(entry)} where ultralytics looks"
    where = f"found {looked} but could not load it" if is_local else f"looked in {looked} (no such folder) and {hub}"
    remote = (
        "unset HF_HUB_OFFLINE and make sure the hub is reachable (or the checkpoint is in the HF cache)"
        if entry.asset is None
        else _ultralytics_fix(entry)
    )
    return ModelNotAvailable(
        f"model {entry.name!r} is not available: {where} ({type(cause).__name__}: {first_line}).\n"
        "Fix one of: set models_dir (or PROMPTPAINT_MODELS_DIR) to a folder containing a complete "
        f"'{entry.name}/'; {remote}; or run `promptpaint models build-tiny DIR` and point models_dir at DIR for the "
        "random-weight test set."
    )


def _cached_commit(hub_id: str, filename: str, revision: str | None) -> str | None:
    """Commit sha of the cached snapshot holding ``filename`` (``.../snapshots/<sha>/<filename>``)."""
    path = try_to_load_from_cache(hub_id, filename, revision=revision)
    if not isinstance(path, str):
        return None
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


TASKS = ("detect", "segment", "inpaint", "generate", "score")


def check_task(name: str, task: str, field: str | None = None) -> ModelEntry:
    """The entry for ``name``; ValueError when it is not a ``task`` model (e.g. a detector given to segment).

    ``field`` names the spec key in the message (default ``<task>.model``).
    """
    entry = get_entry(name)
    if entry.task != task:
        raise ValueError(
            f"{field or task + '.model'}={name!r} is a {entry.task} model; pick a {task} model "
            "(see `promptpaint models list`)"
        )
    return entry


def load_model(
    name: str, models_dir: str | None, device: torch.device, dtype: torch.dtype, task: str | None = None
) -> LoadedModel:
    """Load ``name`` from ``models_dir/name`` if present, else from the hub at the pinned revision.

    ``task`` (detect | segment | inpaint) checks the entry first. Raises ModelNotAvailable (with the fix)
    when neither place has the weights; other errors propagate.
    """
    entry = check_task(name, task) if task else get_entry(name)
    source, is_local = resolve_source(name, models_dir)
    requested = None if is_local else entry.revision
    try:
        processor, model, commit = _LOADERS[entry.family](entry)(source, requested, dtype)
    # transformers / diffusers / huggingface_hub report missing files and offline misses as these.
    except (OSError, EntryNotFoundError) as e:
        raise _not_available(entry, models_dir, is_local, e) from e
    model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()  # pipelines have no eval(); diffusers already loads their modules in eval mode
    if commit is None and not is_local:
        commit = _cached_commit(entry.hub_id, _PROBE_FILES[entry.family][0], entry.revision)
    revision = "local" if is_local else (commit or entry.revision)
    return LoadedModel(entry=entry, source=source, revision=revision, processor=processor, model=model)


def is_available(name: str, models_dir: str | None) -> bool:
    """True if ``models_dir/name`` exists or the pinned checkpoint's config files are in the HF cache (and, for
    ultralytics families, the asset file is where ultralytics looks: working directory or its weights dir).

    Never touches the network.
    """
    entry = get_entry(name)
    if resolve_source(name, models_dir)[1]:
        return True
    if entry.asset is not None and ultralytics_asset_path(entry.asset) is None:
        return False
    return all(
        isinstance(try_to_load_from_cache(entry.hub_id, f, revision=entry.revision), str)
        for f in _PROBE_FILES.get(entry.family, ())
    )


def source_label(entry: ModelEntry) -> str:
    """Where the entry's weights come from without a local folder, pins included (``models list``, errors).

    ``hub_id @ revision``; ultralytics families ``asset from ultralytics/assets @ release`` (+ the hub part).
    """
    hub = f"{entry.hub_id} @ {entry.revision}"
    if entry.asset is None:
        return hub
    asset = f"{entry.asset} from {ULTRALYTICS_ASSETS} @ {entry.asset_release}"
    return asset if entry.hub_id == ULTRALYTICS_ASSETS else f"{asset} + {hub}"


# --------------------------------------------------------------------------------------------------------
# Family-specific helpers for callers
# --------------------------------------------------------------------------------------------------------

_TARGET_SIZE: dict[str, Callable[[int, int], tuple[int, int]]] = {
    # OWLv2 pads the image bottom/right to a square before resizing, so predicted boxes are normalised to
    # the padded square. Passing (side, side) with side = max(h, w) maps them to original pixel coordinates
    # (the padding only ever lies beyond the image). transformers 5.23 also accepts (h, w) here because its
    # OWLv2 post-process scales by max(h, w) itself; (side, side) is correct in every version.
    "owlv2": lambda h, w: (max(h, w), max(h, w)),
    # OWL-ViT stretches the image to a square, so normalised boxes scale by the original (h, w).
    "owlvit": lambda h, w: (h, w),
}


def owl_target_size(h: int, w: int, family: str) -> tuple[int, int]:
    """``target_sizes`` entry (height, width) to pass to the OWL post-process for an h x w original image."""
    try:
        return _TARGET_SIZE[family](h, w)
    except KeyError:
        known = sorted(_TARGET_SIZE)
        raise ValueError(f"no OWL target-size rule for family {family!r}; known: {known}") from None


def pipeline_default_resolution(loaded: LoadedModel) -> int:
    """Natural square side of a diffusers pipeline: UNet sample size x VAE scale.

    512 for SD1.5 / SD2 (64 x 8), 1024 for SDXL (128 x 8), 64 for the tiny models (32 x 2).
    """
    pipe = loaded.model
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def pipeline_size_multiple(loaded: LoadedModel) -> int:
    """Side lengths the pipeline's UNet runs cleanly at: VAE scale x 2^(UNet downsamplings), at least 8.

    At other multiples of 8 diffusers pads the UNet's skip connections (``forward_upsample_size``), which
    works but is not what the checkpoints were trained at. 64 for SD1.5 / SD2 (8 x 2^3), 32 for SDXL
    (8 x 2^2), 8 for the tiny models (2 x 2^1 = 4, raised to the VAE's own 8-pixel input rule).
    """
    pipe = loaded.model
    downsamplings = len(pipe.unet.config.block_out_channels) - 1
    return max(8, int(pipe.vae_scale_factor) * 2**downsamplings)
