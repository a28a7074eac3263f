"""Typed, validated job specs (pydantic) with YAML round-trip and ``--set`` overrides.

One ``EditSpec`` drives the bulk job, sweeps and the server. Every section forbids unknown keys so a
typo (``inpaint.promt``) is an error that names the field, never a silently ignored setting.
Environment variables are read here and nowhere else (``PROMPTPAINT_MODELS_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

STAGES = ("read", "detect", "segment", "mask", "inpaint", "score", "write")
MODES = ("edit", "remove", "detect", "segment")


def comet_env() -> dict[str, Any]:
    """Comet settings from the environment (the one place promptpaint reads them)."""
    return {
        "api_key": os.environ.get("COMET_API_KEY") or None,
        "project": os.environ.get("COMET_PROJECT_NAME") or "promptpaint",
        "workspace": os.environ.get("COMET_WORKSPACE") or None,
    }


class SpecError(ValueError):
    """An invalid spec or override. The CLI turns it into exit code 2."""


def _registry_model(name: str, task: str, field: str) -> str:
    """``name`` if the registry holds a ``task`` model by that name; a message naming ``field`` otherwise."""
    from promptpaint.models.registry import MODELS  # pure data: no torch import

    entry = MODELS.get(name)
    if entry is None:
        known = sorted(n for n, e in MODELS.items() if e.task == task)
        raise ValueError(f"unknown model {name!r}; known {task} models: {', '.join(known)}")
    if entry.task != task:
        raise ValueError(
            f"{field}={name!r} is a {entry.task} model; pick a {task} model (see `promptpaint models list`)"
        )
    return name


def _resolution_multiple_of_8(v: int | None) -> int | None:
    if v is not None and v % 8:
        raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {v}")
    return v


def _check_utf8(v: Any) -> None:
    if isinstance(v, str):
        v.encode("utf-8")  # lone surrogates (non-UTF-8 bytes from argv or a file name) raise here
    elif isinstance(v, list | tuple):
        for x in v:
            _check_utf8(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_utf8(k)
            _check_utf8(x)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    @field_validator("*")
    @classmethod
    def _utf8_text(cls, v: Any) -> Any:
        # Manifests (Arrow) and PNG text chunks only store UTF-8: reject here, not after the model work.
        try:
            _check_utf8(v)
        except UnicodeEncodeError:
            raise ValueError("text must be valid UTF-8 (non-UTF-8 bytes from the shell or a file?)") from None
        return v


class QuerySpec(_Section):
    """One detector query. Written as a plain string when only ``text`` is set (``- car``)."""

    text: str
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="None = detect.threshold")
    prompt: str | None = Field(None, description="inpaint prompt for this query's objects; None = inpaint.prompt")
    negative_prompt: str | None = Field(None, description="None = inpaint.negative_prompt")

    @field_validator("text")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a query's text must be a non-empty string")
        return v.strip()

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> Any:
        data = handler(self)
        if all(v is None for k, v in data.items() if k != "text"):
            return data["text"]  # keeps old specs' YAML and spec hash unchanged
        return data


class DetectSpec(_Section):
    model: str = "owlv2"
    queries: list[QuerySpec] = Field(
        default_factory=lambda: [QuerySpec(text="car")],
        min_length=1,
        description=(
            "what to find: strings ('car'), or mappings {text, threshold, prompt, negative_prompt} to give a "
            "query its own threshold and, in edit mode, its own inpaint prompt (car -> bicycle, person -> statue)"
        ),
    )
    threshold: float = Field(0.1, ge=0.0, le=1.0)
    top_k: int = Field(10, ge=1, le=1000)

    @field_validator("model")
    @classmethod
    def _detect_model(cls, v: str) -> str:
        return _registry_model(v, "detect", "detect.model")

    @field_validator("queries", mode="before")
    @classmethod
    def _strings_are_queries(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]  # `--set detect.queries=car`
        if isinstance(v, list):
            return [{"text": q} if isinstance(q, str) else q for q in v]
        return v

    @field_validator("queries")
    @classmethod
    def _unique(cls, v: list[QuerySpec]) -> list[QuerySpec]:
        texts = [q.text for q in v]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            raise ValueError(f"duplicate queries {dup}: give each query once")
        return v

    @property
    def texts(self) -> list[str]:
        return [q.text for q in self.queries]

    def thresholds(self) -> list[float]:
        return [self.threshold if q.threshold is None else q.threshold for q in self.queries]


class SegmentSpec(_Section):
    model: str = "sam"
    multimask: Literal["best", "largest", "single", "all"] = Field(
        "best",
        description=(
            "best: highest predicted-quality candidate of the model's 3; largest: the largest candidate; single: ask "
            "for one mask; all: every candidate becomes an instance (labels/scores/boxes repeated to match)"
        ),
    )
    clip_to_box: bool = Field(
        True, description="drop mask pixels outside the prompting box (SAM can leak); box-prompted instances only"
    )
    points_file: str | None = Field(
        None,
        description=(
            "sidecar of per-image SAM prompts, JSONL or Parquet (local path or URI; relative to the spec file "
            "when written in it): one record per image keyed by 'path' (the input path as listed, or just its "
            "file name) or 'id' (the row's content id), with optional 'points' [[x, y], ...] px, 'labels' "
            "[1|0, ...] (1 = positive, 0 = negative; one per point) and 'boxes' [[x0, y0, x1, y1], ...] px. "
            "Sidecar boxes are added as instances (label 'prompt', score 1.0) after the detector's boxes; "
            "each box instance is refined by the points inside it, positive and negative (a point inside no "
            "box is unused when the image has boxes); an image with points and no box from either source "
            "gets one instance prompted by all its points; an image with sidecar prompts is never "
            "no_detection because the detector found nothing. Rows without a record are unaffected. "
            "See promptpaint/actors/prompts.py."
        ),
    )

    @field_validator("model")
    @classmethod
    def _segment_model(cls, v: str) -> str:
        return _registry_model(v, "segment", "segment.model")

    @field_validator("points_file")
    @classmethod
    def _points_file_exists(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if not v:
            raise ValueError("points_file must be a file path or URI (or null for no sidecar)")
        if "://" not in v and not os.path.isfile(os.path.expanduser(v)):
            raise ValueError(f"points_file {v!r} does not exist (relative paths in a spec file resolve against it)")
        return os.path.expanduser(v) if "://" not in v else v


class MaskSpec(_Section):
    dilate_px: int = Field(8, ge=0, le=512)
    feather_px: int = Field(4, ge=0, le=512)
    fill_holes: bool = True
    instances: Literal["all", "largest", "top1"] = "all"
    invert: bool = False
    min_area: int = Field(64, ge=0)


class LoraRef(_Section):
    """One LoRA to apply: a ``promptpaint train`` output folder (or a .safetensors file, local or URI) and its scale.

    Written as a plain string when the scale is 1 (``lora: [runs/sks-dog]``).
    """

    path: str
    scale: float = Field(1.0, ge=-8.0, le=8.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_path(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a LoRA path must be a non-empty string")
        return v.strip()


def _check_loras(loras: list[LoraRef], model: str, field_name: str) -> None:
    """Each LoRA exists, is a safetensors file and fits ``model``'s architecture (header only, no torch)."""
    from promptpaint.lora import LoraError, check_lora

    for k, ref in enumerate(loras):
        try:
            check_lora(ref.path, model, f"{field_name}[{k}]")
        except LoraError as e:
            raise ValueError(str(e)) from None


def _drop_empty_lora(data: Any) -> Any:
    # Specs without LoRAs serialize (and hash) exactly as before LoRAs existed: their ids stay valid.
    if isinstance(data, dict) and not data.get("lora"):
        data.pop("lora", None)
    return data


class _WithLoras(_Section):
    """A diffusion section with ``model`` and ``lora``: each LoRA checked against the model when the spec loads;
    serialized (and hashed) without the key while there are none, so older specs keep their ids."""

    _lora_field: ClassVar[str]

    @model_validator(mode="after")
    def _loras_fit(self) -> Any:
        _check_loras(self.lora, self.model, self._lora_field)  # type: ignore[attr-defined]
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> Any:
        return _drop_empty_lora(handler(self))


class InpaintSpec(_WithLoras):
    _lora_field: ClassVar[str] = "inpaint.lora"
    model: str = "sd15-inpaint"
    prompt: str = "a red vintage bicycle"
    negative_prompt: str = "blurry, low quality, distorted"
    remove_prompt: str = "empty background, seamless continuation of the surroundings"
    steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0)
    strength: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, lt=2**63)
    resolution: int | None = Field(None, ge=8, le=4096, description="model-side crop size; None = model default")
    padding: float = Field(0.25, ge=0.0, le=4.0, description="crop margin around the mask, as a fraction of its box")
    prompt_weighting: Literal["none", "compel"] = Field(
        "none",
        description=(
            "compel: weights in prompts via the compel library, e.g. 'a (red)1.3 bicycle', 'a red++ bicycle', "
            '\'("a bicycle", "a statue").blend(0.7, 0.3)\'; none: prompts go to the pipeline as plain text'
        ),
    )

    lora: list[LoraRef] = Field(
        default_factory=list,
        description="LoRAs applied to the inpainting pipeline: [{path, scale}] (a `promptpaint train` output folder)",
    )

    @field_validator("model")
    @classmethod
    def _inpaint_model(cls, v: str) -> str:
        return _registry_model(v, "inpaint", "inpaint.model")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        return _resolution_multiple_of_8(v)


class GenerateSpec(_WithLoras):
    """Text-to-image generation (the ``generate`` stage, ``promptpaint generate``, DreamBooth prior images)."""

    _lora_field: ClassVar[str] = "generate.lora"

    model: str = "sd15"
    prompt: str = Field("a photo of a dog", description="used for rows without their own prompt")
    negative_prompt: str = Field("blurry, low quality, distorted", description="for rows without their own")
    steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0)
    seed: int = Field(0, ge=0, lt=2**63, description="per-image seeds derive from (seed, row id)")
    width: int | None = Field(None, ge=8, le=4096, description="None = the model's native size")
    height: int | None = Field(None, ge=8, le=4096, description="None = the model's native size")
    batch: int = Field(4, ge=1, le=256, description="rows per pipeline call")
    lora: list[LoraRef] = Field(default_factory=list, description="LoRAs applied to the pipeline: [{path, scale}]")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {v}; try {max(8, v // 8 * 8)}")
        return v


def default_prompt_pair(inpaint: InpaintSpec, mode: str, queries: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """(prompt, negative prompt) of an inpaint pass without a query prompt of its own: ``inpaint.prompt`` and
    ``inpaint.negative_prompt``; in remove mode ``inpaint.remove_prompt`` with the queries appended to the
    negative prompt (paint background, not the objects)."""
    if mode == "remove":
        return inpaint.remove_prompt, ", ".join([inpaint.negative_prompt, *queries]).strip(", ")
    return inpaint.prompt, inpaint.negative_prompt


class QCSpec(_Section):
    enabled: bool = Field(False, description="run the CLIP scorer after inpainting (edit/remove modes)")
    model: str = Field("clip", description="score model from the registry (`promptpaint models list`, task score)")
    min_score: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description=(
            "CLIP score (100 x cosine, clipped at 0) each edit pass must reach; a row whose lowest pass score is "
            "below it becomes qc_failed (written under rejected/). None = record the scores only"
        ),
    )
    crop: bool = Field(
        True,
        description=(
            "score each pass on the window it repainted (True) or on the whole edited image (False); either "
            "way CLIP's processor resizes the shorter side and centre-crops a square"
        ),
    )

    @field_validator("model")
    @classmethod
    def _score_model(cls, v: str) -> str:
        return _registry_model(v, "score", "qc.model")


class LineageSpec(_Section):
    mode: Literal["off", "offline", "online", "auto"] = Field(
        "auto", description="auto = online when COMET_API_KEY is set, else an offline archive in <output>/comet/"
    )
    project: str | None = Field(None, description="Comet project; None = COMET_PROJECT_NAME or 'promptpaint'")
    workspace: str | None = Field(None, description="Comet workspace; None = COMET_WORKSPACE or the key's default")
    sample_images: int = Field(16, ge=0, le=1000)
    metrics_every_s: float = Field(10.0, ge=0.0, description="at most one metrics call per this many seconds")
    require: bool = Field(False, description="fail at start (before model work) if Comet cannot be used")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class RuntimeSpec(_Section):
    executor: Literal["ray", "local"] = "ray"
    address: str | None = Field(
        None,
        description=(
            "Ray cluster to join (ray://host:10001 or host:6379); None = RAY_ADDRESS when set, else a new local Ray "
            "(never the cluster Ray's session files remember)"
        ),
    )
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: dict[str, int] = Field(
        default_factory=dict, description="rows per model call, by stage (default 8); read/write follow the block"
    )
    pool_size: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "pin the actor pool of the group holding this stage to N actors; unset = autoscale from 1 to what the "
            "cluster's nodes hold"
        ),
    )
    num_gpus: dict[str, float] = Field(default_factory=dict)
    num_cpus: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="CPUs per model actor; None = what one node holds (CPU jobs)"
    )
    fuse: Literal["auto", "all", "models", "none"] = Field(
        "auto", description="auto = all on CPU, models on GPU (read and write as CPU tasks); none = a pool per stage"
    )
    manifest_every: int = Field(
        256,
        ge=1,
        description=(
            "rows per task block (one Ray block, one manifest part) at most, rounded down to whole model blocks; "
            "blocks start at one model block and double up to it"
        ),
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, mps or cuda[:N] (xpu/npu/hpu[:N] too), got {v!r}")
        return v

    @field_validator("batch_size", "pool_size", "num_gpus")
    @classmethod
    def _known_stages(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        if any(x <= 0 for x in v.values()):
            raise ValueError(f"values must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _dtype_fits_device(self) -> RuntimeSpec:
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError(
                "runtime.dtype=float16 is not supported on CPU; use float32 or bfloat16 (or a CUDA device)"
            )
        return self

    def batch(self, stage: str) -> int:
        return int(self.batch_size.get(stage, 8))

    def resolve_dtype(self, device_type: str) -> str:
        """The dtype name a stage on ``device_type`` runs at; SpecError for fp16 on CPU."""
        dt = self.dtype if self.dtype != "auto" else ("float16" if device_type == "cuda" else "float32")
        if device_type == "cpu" and dt == "float16":
            raise SpecError(
                "invalid spec: runtime.dtype=float16 is not supported on CPU and this job runs on CPU "
                "(no GPU in the cluster, or runtime.device=cpu); use float32 or bfloat16"
            )
        return dt

    def resolve(self) -> tuple[Any, Any]:
        """(torch.device, torch.dtype): cuda when present, fp16 on cuda, fp32 on cpu, unless set."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        return dev, getattr(torch, self.resolve_dtype(dev.type))


class LimitsSpec(_Section):
    max_pixels: int = Field(40_000_000, ge=1)
    max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"])
    max_error_rate: float | None = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description=(
            "stop the job (exit 1) when more than this fraction of the rows processed so far failed in a model "
            "stage or in promptpaint itself (model_error, internal_error); bad input files never count. "
            "null = never stop"
        ),
    )
    error_rate_min_rows: int = Field(32, ge=1, description="rows processed before max_error_rate is checked")

    @field_validator("formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]


class WriteSpec(_Section):
    naming: Literal["input", "id"] = Field(
        "input",
        description=(
            "input: images/<path relative to the input root, without extension>.<ext> (inputs whose names differ "
            "only in extension keep it: a.jpg + a.png -> a.jpg.png, a.png.png); id: images/<row id>.<ext>"
        ),
    )
    format: Literal["png", "webp", "jpeg"] = Field(
        "png",
        description=(
            "edited images' format; masks are always PNG. jpeg and lossy webp change every pixel a little, so "
            "'mask == 0 => pixel identical' holds for png and lossless webp only"
        ),
    )
    quality: int = Field(95, ge=1, le=100, description="jpeg / lossy webp quality")
    lossless: bool = Field(True, description="webp: lossless (default) or lossy at `quality`")
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of PNG images (1: measured 3.6x faster than 6, 10 % larger)"
    )


@dataclass(frozen=True)
class ModeInfo:
    """What a job mode runs and produces: one table instead of ``if mode == ...`` in every module."""

    stages: tuple[str, ...]  # in order; ``score`` is added after ``inpaint`` when qc.enabled
    done_status: str  # status of a row that went through every stage
    output_sections: frozenset[str]  # spec sections (besides mode/detect/segment/limits) that change outputs
    export: bool = False  # writes <output>/coco.json
    qc: bool = False  # takes the CLIP scorer when qc.enabled


MODE_TABLE: dict[str, ModeInfo] = {
    "edit": ModeInfo(
        ("read", "detect", "segment", "mask", "inpaint", "write"), "edited", frozenset({"mask", "inpaint"}), qc=True
    ),
    "remove": ModeInfo(
        ("read", "detect", "segment", "mask", "inpaint", "write"), "edited", frozenset({"mask", "inpaint"}), qc=True
    ),
    "detect": ModeInfo(("read", "detect", "write"), "detected", frozenset(), export=True),
    "segment": ModeInfo(("read", "detect", "segment", "write"), "segmented", frozenset(), export=True),
}


@dataclass(frozen=True)
class EditPass:
    """One inpaint pass: the prompt pair and the detection labels whose objects it repaints."""

    prompt: str
    negative_prompt: str
    labels: tuple[str, ...]

    @property
    def pair(self) -> tuple[str, str]:
        return self.prompt, self.negative_prompt


class EditSpec(_Section):
    input: str
    output: str
    models_dir: str | None = None
    mode: Literal["edit", "remove", "detect", "segment"] = Field(
        "edit",
        description=(
            "edit: repaint each query's objects with its prompt; remove: paint them out (inpaint.remove_prompt, "
            "the queries as negative prompt); detect: boxes only, exported as <output>/coco.json; segment: "
            "instance masks only (masks/<name>.png label maps + RLE in the manifest), exported as COCO instance "
            "segmentation"
        ),
    )
    detect: DetectSpec = Field(default_factory=DetectSpec)
    segment: SegmentSpec = Field(default_factory=SegmentSpec)
    mask: MaskSpec = Field(default_factory=MaskSpec)
    inpaint: InpaintSpec = Field(default_factory=InpaintSpec)
    qc: QCSpec = Field(default_factory=QCSpec)
    lineage: LineageSpec = Field(default_factory=LineageSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    write: WriteSpec = Field(default_factory=WriteSpec)
    # What the outputs were made with beyond the spec: weight fingerprints and the resolved dtype, set by the
    # job (``with_identity``) before any id is computed, so other weights give other ids.
    _identity: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _env_models_dir(self) -> EditSpec:
        if self.models_dir is None and os.environ.get("PROMPTPAINT_MODELS_DIR"):
            object.__setattr__(self, "models_dir", os.environ["PROMPTPAINT_MODELS_DIR"])
        return self

    @property
    def mode_info(self) -> ModeInfo:
        return MODE_TABLE[self.mode]

    def passes(self) -> list[EditPass]:
        """The inpaint passes, in order: one per distinct (prompt, negative prompt) over the queries.

        edit: each query's own prompt / negative prompt, else ``inpaint.prompt`` / ``inpaint.negative_prompt``;
        sidecar-prompted instances (label ``prompt``) take the defaults. remove: one pass for everything,
        ``inpaint.remove_prompt`` with the queries appended to the negative prompt.
        """
        inp = self.inpaint
        default = default_prompt_pair(inp, self.mode, self.detect.texts)
        if self.mode == "remove":
            return [EditPass(*default, (*self.detect.texts, "prompt"))]
        by_pair: dict[tuple[str, str], list[str]] = {}
        for q in self.detect.queries:
            pair = (
                inp.prompt if q.prompt is None else q.prompt,
                inp.negative_prompt if q.negative_prompt is None else q.negative_prompt,
            )
            by_pair.setdefault(pair, []).append(q.text)
        by_pair.setdefault(default, []).append("prompt")
        return [EditPass(p, n, tuple(labels)) for (p, n), labels in by_pair.items()]

    def edit_prompts(self) -> dict[str, tuple[str, str]]:
        """Detection label -> (prompt, negative prompt) of the pass that repaints its objects (see ``passes``)."""
        return {label: p.pair for p in self.passes() for label in p.labels}

    def default_pass(self) -> tuple[str, str]:
        """(prompt, negative prompt) for rows that carry no per-pass prompts."""
        return default_prompt_pair(self.inpaint, self.mode, self.detect.texts)

    def stages(self) -> list[str]:
        """The stages this job's mode runs, in order (``score`` only with ``qc.enabled``)."""
        info = self.mode_info
        stages = list(info.stages)
        if info.qc and self.qc.enabled:
            stages.insert(stages.index("inpaint") + 1, "score")
        return stages

    def with_identity(self, identity: dict[str, Any]) -> EditSpec:
        """A copy whose ``spec_hash`` (and so every row id) also covers ``identity`` (weights, dtype)."""
        out = self.model_copy(deep=True)
        out._identity = dict(identity)
        return out

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def output_hash_fields(self) -> dict[str, Any]:
        """Every field that changes an output (image, mask, box, score, file format); runtime and paths do not.

        With ``with_identity``, also the weights (fingerprints) and the dtype the models run at.
        """
        fields = {"mode", "detect", "segment", "limits", *self.mode_info.output_sections}
        if self.mode_info.qc and self.qc.enabled:
            fields.add("qc")
        out = self.model_dump(include=fields)
        if "inpaint" in self.mode_info.output_sections:  # the edited image's encoding
            out["write"] = self.write.model_dump(include={"format", "quality", "lossless"})
        if self._identity:
            out["identity"] = self._identity
        return out

    def spec_hash(self) -> str:
        blob = json.dumps(self.output_hash_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flattened ``section.key`` -> value, for manifests and experiment parameters."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict) and obj:
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.model_dump(mode="json"))
        return out


# ------------------------------------------------------------------------------------------------- training

TRAINABLE_FAMILIES = ("sd", "sd-inpaint", "sdxl", "sdxl-inpaint")


class LoraTrainSpec(_Section):
    """The LoRA adapters ``promptpaint train`` adds (peft ``LoraConfig``)."""

    rank: int = Field(4, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None = rank (scale 1, as diffusers' script)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        description="UNet modules that get adapters (its attention projections)",
    )
    text_encoder: bool = Field(False, description="also train adapters on the text encoder(s)")
    text_encoder_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    @field_validator("target_modules", "text_encoder_modules")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(m, str) and m.strip() for m in v):
            raise ValueError("name at least one module (e.g. to_q)")
        return v


class TrainSpec(_Section):
    """DreamBooth-LoRA fine-tuning: what to learn, how, and on how many workers."""

    model: str = Field("sd15", description="base model (registry: sd15, sdxl, sd15-inpaint, sd2-inpaint, sdxl-inpaint)")
    instance_data: str = Field(..., description="folder or URI of 3-20 photos of the subject")
    instance_prompt: str = Field("a photo of sks dog", description="prompt with the subject's token")
    class_prompt: str = Field("a photo of a dog", description="the subject's class, without the token")
    prior_preservation: bool = Field(True, description="also train on generated class images (prior-preservation loss)")
    num_class_images: int = Field(100, ge=1, le=100_000)
    prior_loss_weight: float = Field(1.0, ge=0.0)
    class_model: str | None = Field(
        None, description="text-to-image model for the class images; None = the base (or its text-to-image twin)"
    )
    class_steps: int = Field(30, ge=1, le=1000, description="denoising steps per class image")
    resolution: int | None = Field(None, ge=8, le=4096, description="training side (multiple of 8); None = the model's")
    center_crop: bool = Field(True, description="centre crop (else random crop) to a square after resizing")
    random_flip: bool = True
    masks: Literal["random", "auto"] = Field(
        "random",
        description=(
            "inpainting bases: random = random rectangles/ellipses; auto = the subject's own mask from promptpaint's "
            "detect -> segment stages on the instance photos (the query is mask_query)"
        ),
    )
    mask_query: str | None = Field(None, description="masks: auto query; None = the class prompt's last word")
    mask_threshold: float = Field(0.1, ge=0.0, le=1.0, description="masks: auto detection threshold")
    mask_detect_model: str = Field("owlv2", description="masks: auto detector")
    mask_segment_model: str = Field("sam", description="masks: auto segmenter")
    class_data: str | None = Field(
        None, description="class-image cache folder (shared across runs); None = <storage_path>/class_images"
    )
    lora: LoraTrainSpec = Field(default_factory=LoraTrainSpec)
    learning_rate: float = Field(1e-4, gt=0.0, lt=1.0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(400, ge=1, le=10_000_000, description="optimizer steps")
    batch_size: int = Field(1, ge=1, le=256, description="instance images per worker per micro-step")
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = fp16 on GPU, none on CPU; LoRA parameters always stay fp32"
    )
    gradient_checkpointing: bool = False
    snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR loss weighting (5.0 is the paper's); None = off")
    seed: int = Field(0, ge=0, lt=2**31)
    checkpoint_every: int = Field(100, ge=1, description="report a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints Ray keeps (the newest)")
    validation_prompts: list[str] = Field(default_factory=list)
    validation_every: int = Field(100, ge=1, description="validation images every N steps (and at the end)")
    validation_steps: int = Field(25, ge=1, le=1000, description="denoising steps of a validation image")
    num_workers: int = Field(1, ge=1, le=4096, description="data-parallel workers (one GPU each with use_gpu)")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto = when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1 = unlimited)")
    storage_path: str | None = Field(None, description="Ray Train storage (checkpoints); None = <output>/ray")
    run_name: str | None = Field(None, description="Ray Train run name; None = the output folder's name")

    @field_validator("model")
    @classmethod
    def _trainable(cls, v: str) -> str:
        from promptpaint.models.registry import MODELS

        entry = MODELS.get(v)
        if entry is None or entry.family not in TRAINABLE_FAMILIES:
            known = sorted(n for n, e in MODELS.items() if e.family in TRAINABLE_FAMILIES)
            raise ValueError(f"{v!r} is not a trainable diffusion model; pick one of: {', '.join(known)}")
        return v

    @field_validator("class_model")
    @classmethod
    def _class_model(cls, v: str | None) -> str | None:
        return None if v is None else _registry_model(v, "generate", "train.class_model")

    @field_validator("mask_detect_model")
    @classmethod
    def _mask_detect(cls, v: str) -> str:
        return _registry_model(v, "detect", "train.mask_detect_model")

    @field_validator("mask_segment_model")
    @classmethod
    def _mask_segment(cls, v: str) -> str:
        return _registry_model(v, "segment", "train.mask_segment_model")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        return _resolution_multiple_of_8(v)

    @field_validator("instance_data", "instance_prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    @property
    def inpainting(self) -> bool:
        from promptpaint.models.registry import get_entry

        return get_entry(self.model).task == "inpaint"

    def resolved_class_model(self) -> str:
        """The text-to-image model that draws the class images; SpecError when the base has none."""
        if self.class_model:
            return self.class_model
        from promptpaint.models.registry import get_entry

        entry = get_entry(self.model)
        if entry.task == "generate":
            return self.model
        if entry.text_to_image:
            return entry.text_to_image
        raise SpecError(
            f"invalid spec: train.model={self.model!r} has no text-to-image twin in the registry to draw class images; "
            "set train.class_model, or train.prior_preservation=false"
        )

    def resolved_mask_query(self) -> str:
        if self.mask_query:
            return self.mask_query
        words = re.findall(r"[\w-]+", self.class_prompt)
        if not words:
            raise SpecError(
                "invalid spec: train.class_prompt has no word to use as the mask query; set train.mask_query"
            )
        return words[-1]


class TrainJobSpec(_Section):
    """``promptpaint train``'s spec: the training section, where the LoRA goes, lineage and the helper jobs' runtime."""

    output: str = Field(..., description="folder for the LoRA, model card and spec (the LoRA path users load)")
    models_dir: str | None = None
    train: TrainSpec
    lineage: LineageSpec = Field(default_factory=LineageSpec)
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec, description="Ray address; device/dtype/batches of the class-image and mask jobs"
    )
    _identity: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _checks(self) -> TrainJobSpec:
        if self.models_dir is None and os.environ.get("PROMPTPAINT_MODELS_DIR"):
            object.__setattr__(self, "models_dir", os.environ["PROMPTPAINT_MODELS_DIR"])
        t = self.train
        if t.masks == "auto" and not t.inpainting:
            raise ValueError(f"train.masks=auto needs an inpainting base model; {t.model!r} is text-to-image")
        if t.mixed_precision == "fp16" and t.use_gpu is False:
            raise ValueError("train.mixed_precision=fp16 needs GPUs (use_gpu); use bf16 or no on CPU")
        return self

    mode: ClassVar[str] = "train"  # what Lineage tags the experiment with

    @property
    def run_name(self) -> str:
        return self.train.run_name or (posixpath.basename(self.output.rstrip("/")) or "promptpaint-lora")

    @property
    def storage_path(self) -> str:
        return self.train.storage_path or posixpath.join(self.output, "ray")

    def with_identity(self, identity: dict[str, Any]) -> TrainJobSpec:
        out = self.model_copy(deep=True)
        out._identity = dict(identity)
        return out

    def spec_hash(self) -> str:
        """Everything that changes the trained LoRA: the train section (minus where it is stored) and the weights."""
        data = self.train.model_dump(mode="json", exclude={"storage_path", "run_name", "num_workers", "use_gpu"})
        data["num_workers"] = self.train.num_workers  # the global batch, so the result, depends on it
        blob = json.dumps({"train": data, "identity": self._identity}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        return EditSpec.flat(self)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- serving


class HttpSpec(_Section):
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 only behind your own network controls")
    port: int = Field(8000, ge=1, le=65535)
    token_file: str | None = Field(
        None, description="file holding the bearer token; None = the PROMPTPAINT_API_TOKEN environment variable"
    )
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024, description="larger requests get 413 before decoding")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS; empty = CORS off")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429 when a model's queue is full")


class DeploymentsSpec(_Section):
    max_batch_size: int = Field(4, ge=1, le=256, description="requests per @serve.batch call of a model deployment")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0.0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(8, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(16, ge=1, description="queued beyond that per deployment; more get 429")
    num_cpus: float = Field(0.5, gt=0.0, description="CPUs per model replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per model replica (1 on a GPU cluster)")


class ServeSpec(_Section):
    """``promptpaint serve``: the pipeline as an HTTP service. Model sections give the request defaults."""

    models_dir: str | None = None
    output: str = Field("serve-output", description="where logs and the offline Comet archive go")
    detect: DetectSpec = Field(default_factory=DetectSpec)
    segment: SegmentSpec = Field(default_factory=SegmentSpec)
    mask: MaskSpec = Field(default_factory=MaskSpec)
    inpaint: InpaintSpec = Field(default_factory=InpaintSpec)
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    http: HttpSpec = Field(default_factory=HttpSpec)
    deployments: DeploymentsSpec = Field(default_factory=DeploymentsSpec)
    lora_store: str | None = Field(None, description="folder or URI of `promptpaint train` outputs: <store>/<id>/")
    lora_cache: int = Field(4, ge=1, le=64, description="LoRAs kept loaded per replica (LRU)")
    lineage: LineageSpec = Field(default_factory=lambda: LineageSpec(mode="offline"))
    sample_every: int = Field(100, ge=1, description="log 1 request in N (images included) to Comet")
    max_steps: int = Field(100, ge=1, le=1000, description="most denoising steps a request may ask for (422 above)")
    max_generate_pixels: int = Field(
        1024 * 1024, ge=64, description="largest width x height a /v1/generate request may ask for (422 above)"
    )

    @model_validator(mode="after")
    def _env_models_dir(self) -> ServeSpec:
        if self.models_dir is None and os.environ.get("PROMPTPAINT_MODELS_DIR"):
            object.__setattr__(self, "models_dir", os.environ["PROMPTPAINT_MODELS_DIR"])
        if self.deployments.min_replicas > self.deployments.max_replicas:
            raise ValueError("deployments.min_replicas must be <= deployments.max_replicas")
        return self

    mode: ClassVar[str] = "serve"

    def spec_hash(self) -> str:
        data = self.model_dump(mode="json", include={"detect", "segment", "mask", "inpaint", "generate", "limits"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        return EditSpec.flat(self)  # type: ignore[arg-type]


def load_serve_spec(path: str | Path | None, overrides: list[str] | None = None) -> ServeSpec:
    """A serve spec from YAML (paths relative to the file) or the defaults, with ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
        base = Path(path).resolve().parent
        for key in ("models_dir", "output", "lora_store"):
            v = data.get(key)
            if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v) and not v.startswith("~"):
                data[key] = os.path.normpath(base / v)
    data = apply_overrides(data, overrides or [])
    return build_spec(ServeSpec, data, source=str(path or "arguments"))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-scalar(value))."""
    if "=" not in item:
        raise SpecError(f"--set expects key.path=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise SpecError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
        raise SpecError(f"--set {key}: value {raw[:80]!r} is not valid YAML: {e}") from e
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "a cat: sitting" is a prompt, not a mapping; write {a: b} for a mapping
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid spec ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        given = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see examples/*.yaml for every key)"
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        given_s = "" if isinstance(given, dict) else f" (given {given!r})"
        # a section-level check whose message already names its field (inpaint.lora[0]: ...) needs no prefix
        named = isinstance(given, dict) and (loc == "<root>" or msg.startswith(f"{loc}."))
        lines.append(f"  {msg}" if named else f"  {loc}: {msg}{given_s}")
    return "\n".join(lines)


def build_spec(model: type[BaseModel], data: dict[str, Any], source: str = "spec") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation(e, source)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise SpecError(f"spec file {str(p)!r} is not UTF-8 text ({e}); save it as UTF-8") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise SpecError(f"spec file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_edit_spec(path: str | Path, overrides: list[str] | None = None) -> EditSpec:
    """Load YAML, apply ``--set`` overrides, validate.

    Relative paths written in the spec file resolve against the spec's folder (so examples run from
    anywhere); relative paths given with ``--set`` resolve against the current directory.
    """
    data = load_yaml(path)
    base = Path(path).resolve().parent
    for key in ("input", "output", "models_dir"):
        v = data.get(key)
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v) and not v.startswith("~"):
            data[key] = str(base / v)
    seg = data.get("segment")
    v = seg.get("points_file") if isinstance(seg, dict) else None
    if isinstance(v, str) and v.strip() and "://" not in v and not os.path.isabs(v) and not v.startswith("~"):
        seg["points_file"] = str(base / v.strip())
    data = apply_overrides(data, overrides or [])
    return build_spec(EditSpec, data, source=str(path))


def load_train_spec(path: str | Path, overrides: list[str] | None = None) -> TrainJobSpec:
    """Load a training spec like ``load_edit_spec``: relative paths in the file resolve against its folder."""
    data = load_yaml(path)
    base = Path(path).resolve().parent

    def rel(v: Any) -> Any:
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v) and not v.startswith("~"):
            return os.path.normpath(base / v)
        return v

    for key in ("output", "models_dir"):
        if key in data:
            data[key] = rel(data[key])
    train = data.get("train")
    if isinstance(train, dict):
        for key in ("instance_data", "storage_path", "class_data"):
            if key in train:
                train[key] = rel(train[key])
    data = apply_overrides(data, overrides or [])
    return build_spec(TrainJobSpec, data, source=str(path))
