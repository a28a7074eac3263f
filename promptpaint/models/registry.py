"""Registry data: every model promptpaint runs, its task, family, hub id and pinned revision.

Pure data and lookups, importable without torch / transformers / diffusers / ultralytics: ``config.py``
validates model names against it when a spec is parsed, long before (or without) any model loads.
What a family *does* (load, probe, build tiny, run a stage) lives in its module, ``FAMILIES[entry.family]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELS",
    "TASKS",
    "ULTRALYTICS_ASSETS",
    "ULTRALYTICS_RELEASE",
    "ModelEntry",
    "check_task",
    "get_entry",
    "resolve_source",
    "source_label",
]

TASKS = ("detect", "segment", "inpaint", "generate", "score")

# Ultralytics weights are release assets of this GitHub repo, not hub repos; v8.4.0 is the release ultralytics
# 8.4.x itself downloads them from (attempt_download_asset's default).
ULTRALYTICS_ASSETS = "ultralytics/assets"
ULTRALYTICS_RELEASE = "v8.4.0"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # registry key
    task: str  # one of TASKS
    family: str  # key of promptpaint.models.FAMILIES: loader, probe, tiny builder, stage backend, defaults
    hub_id: str
    revision: str | None  # pinned hub commit; ignored for local folders
    default_resolution: int | None  # inpaint / generate: the checkpoint's native square side
    description: str
    pipeline: str | None = None  # diffusers pipeline class (diffusers families): the stage never if-chains on it
    asset: str | None = None  # ultralytics families: the .pt file released on github.com/ultralytics/assets
    asset_release: str | None = None  # ... and the release it is pinned to
    # diffusion families: the UNet architecture a LoRA is tied to (sd1 | sd2 | sdxl); inpainting and
    # text-to-image checkpoints of one architecture share their attention layers, so their LoRAs are interchangeable
    arch: str | None = None
    text_to_image: str | None = None  # inpaint entries: the registry's text-to-image model of the same architecture


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
            arch="sd1",
            text_to_image="sd15",
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
            arch="sd2",
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
            arch="sdxl",
            text_to_image="sdxl",
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
            arch="sd1",
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
            arch="sdxl",
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


def resolve_source(name: str, models_dir: str | None) -> tuple[str, bool]:
    """Return ``(models_dir/name, True)`` if that folder exists, else ``(hub_id, False)``."""
    entry = get_entry(name)
    if models_dir is not None:
        local = Path(models_dir) / name
        if local.is_dir():
            return str(local), True
    return entry.hub_id, False


def source_label(entry: ModelEntry) -> str:
    """Where the entry's weights come from without a local folder, pins included (``models list``, errors).

    ``hub_id @ revision``; ultralytics families ``asset from ultralytics/assets @ release`` (+ the hub part).
    """
    hub = f"{entry.hub_id} @ {entry.revision}"
    if entry.asset is None:
        return hub
    asset = f"{entry.asset} from {ULTRALYTICS_ASSETS} @ {entry.asset_release}"
    return asset if entry.hub_id == ULTRALYTICS_ASSETS else f"{asset} + {hub}"
