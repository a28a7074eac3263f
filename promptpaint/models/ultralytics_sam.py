"""MobileSAM and FastSAM: prompted segmentation through ultralytics' own predictors.

MobileSAM is SAM with a small encoder: prompts shape the masks. FastSAM segments everything first and prompts
only select among those masks; both hand back the same candidates, so the Segmenter treats them alike.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptpaint.actors.prompts import InstancePrompt
from promptpaint.models.base import Candidates, Family, LoadedModel
from promptpaint.models.registry import ModelEntry
from promptpaint.models.tiny import SaveAs
from promptpaint.models.ultralytics import (
    UltralyticsParts,
    bgr,
    import_ultralytics,
    predict_args,
    tiny_predict_settings,
    tiny_yolo_init,
    torch_threads_kept,
    ultralytics_loader,
)

IMGSZ = 1024  # both letterbox to the side the real checkpoints were trained at

# FastSAM everything-mode thresholds: the values of ultralytics' FastSAM documentation.
FASTSAM_CONF = 0.4
FASTSAM_IOU = 0.9


def _sam_calls(prompts: list[InstancePrompt]) -> list[tuple[list[int], dict[str, Any]]]:
    """One image's instances -> ultralytics SAM prompt calls, one per prompt kind (has a box, number of points).

    SAM's prompt encoder takes boxes for every instance of a call or for none, and pads points with a dummy
    point only when there is no box, so instances of one kind share a call without padding (as SamBackend).
    Returns (instance indices, kwargs): ``bboxes`` (N, 4) float32 xyxy, ``points`` (N, P, 2) float32 and
    ``labels`` (N, P) int64 (1 positive, 0 negative), all in original-image pixels.
    """
    groups: dict[tuple[bool, int], list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault(p.kind, []).append(j)
    calls = []
    for (has_box, n_points), idx in groups.items():
        kwargs: dict[str, Any] = {}
        if has_box:
            kwargs["bboxes"] = np.stack([b for j in idx if (b := prompts[j].box) is not None]).astype(np.float32)
        if n_points:
            kwargs["points"] = np.stack([prompts[j].points for j in idx]).astype(np.float32)
            kwargs["labels"] = np.stack([prompts[j].labels for j in idx]).astype(np.int64)
        calls.append((idx, kwargs))
    return calls


class UltralyticsSamBackend:
    """MobileSAM (or any ultralytics SAM checkpoint) through ultralytics' SAM ``Predictor``.

    Per image: ``set_image`` runs the image encoder once, then one decoder call per prompt kind. Boxes, positive
    and negative points (label 0: SAM's background points) all go to SAM as given. ultralytics' SAM predictor
    takes one image at a time (``pre_transform`` asserts it), so images loop. ``multimask``: SAM's 3 candidates,
    else 1; scores are SAM's predicted IoU.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        from ultralytics.models.sam import Predictor

        parts: UltralyticsParts = loaded.processor
        self.predictor = Predictor(
            overrides={"task": "segment", "mode": "predict", **predict_args(device, dtype, parts.imgsz)}
        )
        with torch_threads_kept():
            self.predictor.setup_model(model=loaded.model.model, verbose=False)
        # The predictor drops candidates whose predicted IoU is <= conf, and its config only allows conf >= 0, so a
        # negative predicted IoU would always go. We need every candidate of every prompt, in order.
        self.predictor.args.conf = -math.inf

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]:
        m = 3 if multimask else 1
        out = []
        for image, prompts in zip(images, per_image, strict=True):
            h, w = image.shape[:2]
            cand = np.zeros((len(prompts), m, h, w), bool)
            scores = np.zeros((len(prompts), m), np.float32)
            if prompts:
                # 1. Image encoder, once per image.
                self.predictor.set_image(bgr(image))
                # 2. One decoder call per prompt kind; masks come back at the original size, instance-major.
                for idx, kwargs in _sam_calls(prompts):
                    (res,) = self.predictor(**kwargs, multimask_output=multimask)
                    cand[idx] = res.masks.data.cpu().numpy().astype(bool).reshape(len(idx), m, h, w)
                    scores[idx] = res.boxes.conf.float().cpu().numpy().reshape(len(idx), m)
                self.predictor.reset_image()
            out.append((cand, scores))
        return out


class FastSamBackend:
    """FastSAM through ultralytics: everything-mode masks for the batch, then ``FastSAMPredictor.prompt`` per instance.

    FastSAM's prompts select whole masks among the everything-mode masks; they never shape a mask. ultralytics'
    rules (models/fastsam/predict.py), applied to each instance's own box and points:

    - box: the mask with the highest IoU against the box;
    - positive points: every mask containing one of them, minus masks containing a negative point;
    - only negative points: every mask containing none of them;
    - box and points: the union of both selections (a negative point does not remove the box's mask).

    Negative points are therefore honoured only at the level of whole masks, and a box with only negative
    points selects nearly everything outside them (``segment.clip_to_box`` keeps that inside the box).
    The instance's candidate is the union of the selected masks, its score the highest selected confidence;
    no selected mask gives an empty mask with score 0. FastSAM gives one mask per instance: M = 1 whatever
    ``multimask`` asks. Text prompts (CLIP) are not used.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        parts: UltralyticsParts = loaded.processor
        self.fastsam = loaded.model  # ultralytics FastSAM
        self.args = predict_args(device, dtype, parts.imgsz)

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]:
        # 1. Everything mode for the whole batch; retina masks are at the original size.
        with torch_threads_kept():
            everything = self.fastsam.predict(
                [bgr(im) for im in images], conf=FASTSAM_CONF, iou=FASTSAM_IOU, retina_masks=True, **self.args
            )
        predictor = self.fastsam.predictor
        out = []
        for image, prompts, res in zip(images, per_image, everything, strict=True):
            h, w = image.shape[:2]
            cand = np.zeros((len(prompts), 1, h, w), bool)
            scores = np.zeros((len(prompts), 1), np.float32)
            for j, p in enumerate(prompts):
                # 2. ultralytics' own selection among this image's masks, for this instance's prompt.
                (sel,) = predictor.prompt(
                    [res],
                    bboxes=None if p.box is None else p.box[None],
                    points=p.points if len(p.points) else None,
                    labels=p.labels if len(p.points) else None,
                )
                if len(sel):
                    cand[j, 0] = sel.masks.data.bool().any(0).cpu().numpy()
                    scores[j, 0] = float(sel.boxes.conf.max())
            out.append((cand, scores))
        return out


# -------------------------------------------------------------------------------------------------------- tiny


def _build_mobile_sam(entry: ModelEntry) -> list[Any]:
    """MobileSAM with random weights, at full size (10.1 M params, 41 MB).

    ultralytics' SAM loader picks the architecture from the file name (``mobile_sam.pt`` -> build_mobile_sam,
    models/sam/build.py) and loads the state dict strictly, so no smaller network loads through it. The tiny
    folder predicts at 128 px instead of 1024 (TinyViT and the prompt encoder follow ``set_imgsz``): one image
    encoder pass takes ~0.05 s on one idle CPU core instead of ~3 s (~8 s on a busy 2-core box).
    """
    import_ultralytics()
    from ultralytics.models.sam.build import build_mobile_sam

    sam = build_mobile_sam()
    return [SaveAs(lambda folder: torch.save(sam.state_dict(), folder / "mobile_sam.pt")), tiny_predict_settings()]


def _build_fastsam(entry: ModelEntry) -> list[Any]:
    """Tiny FastSAM: FastSAM is a one-class YOLOv8-seg, so ultralytics' yolov8-seg.yaml at scale n with nc=1."""
    import_ultralytics()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load
    from ultralytics.utils import YAML

    cfg = {k: v for k, v in yaml_model_load("yolov8n-seg.yaml").items() if k != "yaml_file"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "yolov8n-seg.yaml"  # ultralytics reads the scale (n) and the task from the name
        YAML.save(path, {**cfg, "nc": 1})
        seg = YOLO(str(path))
    tiny_yolo_init(seg.model)
    return [SaveAs(lambda folder: seg.save(folder / "model.pt")), tiny_predict_settings()]


# The weights are ultralytics release assets, not hub repos: nothing to probe in the HF cache
# (is_available looks for the asset file where ultralytics does).
ULTRALYTICS_SAM = Family(
    name="ultralytics-sam",
    task="segment",
    load=ultralytics_loader("SAM", IMGSZ),
    probe_files=(),
    build_tiny=_build_mobile_sam,
    backend=UltralyticsSamBackend,
    defaults={"imgsz": IMGSZ},
)

FASTSAM = Family(
    name="fastsam",
    task="segment",
    load=ultralytics_loader("FastSAM", IMGSZ),
    probe_files=(),
    build_tiny=_build_fastsam,
    backend=FastSamBackend,
    defaults={"imgsz": IMGSZ, "conf": FASTSAM_CONF, "iou": FASTSAM_IOU},
)
