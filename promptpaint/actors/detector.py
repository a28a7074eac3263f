"""Text queries -> boxes with an open-vocabulary detector (OWLv2 / OWL-ViT; more families register a backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from promptpaint.actors.common import Batch, active, ensure_column, load_stage_model, run_with_fallback, timed
from promptpaint.actors.prompts import merge_instances
from promptpaint.actors.ultralytics_backends import YoloWorldBackend
from promptpaint.config import DetectSpec, RuntimeSpec
from promptpaint.models import LoadedModel, owl_target_size

# (boxes (N, 4) float32 xyxy px of the original image, scores (N,) float32, query index (N,) int64)
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


class DetectBackend(Protocol):
    """One model family's detector: images x queries -> raw detections at or above ``threshold``."""

    def __call__(self, images: list[np.ndarray], queries: list[str], threshold: float) -> list[Detections]: ...


class OwlBackend:
    """OWLv2 / OWL-ViT through their transformers processor (one padded batch of images x queries)."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.processor, self.model, self.family = loaded.processor, loaded.model, loaded.entry.family
        self.device, self.dtype = device, dtype

    def __call__(self, images: list[np.ndarray], queries: list[str], threshold: float) -> list[Detections]:
        inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt")
        inputs = {k: self._to_device(v) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        # Back to pixel boxes of the original image (OWLv2 pads to a square first).
        sizes = [owl_target_size(im.shape[0], im.shape[1], self.family) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs=outputs, threshold=threshold, target_sizes=sizes
        )
        return [
            (
                r["boxes"].float().cpu().numpy().astype(np.float32).reshape(-1, 4),
                r["scores"].float().cpu().numpy().astype(np.float32).reshape(-1),
                r["labels"].cpu().numpy().astype(np.int64).reshape(-1),
            )
            for r in results
        ]

    def _to_device(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return v.to(self.device, self.dtype)
        return v.to(self.device)


# family -> backend constructor (loaded model, device, dtype). A new detector family registers here.
DETECT_BACKENDS: dict[str, Callable[[LoadedModel, torch.device, torch.dtype], DetectBackend]] = {
    "owlv2": OwlBackend,
    "owlvit": OwlBackend,
    "yolo-world": YoloWorldBackend,
}


class Detector:
    """Open-vocabulary detection.

    Batch in:  image list[(H, W, 3) uint8]; optional prompt_boxes / prompt_points (the ``prompts`` stage)
    Batch out: + boxes list[(N, 4) float32 xyxy pixels], labels list[list[str]], det_scores list[(N,) float32]
               rows with no box above its query's threshold get status ``no_detection``.

    Each query keeps the boxes at or above its own threshold (``detect.queries[k].threshold``, else
    ``detect.threshold``); then the best ``top_k`` over all queries are kept.

    With sidecar prompts (``promptpaint.actors.prompts``), labels and det_scores hold one entry per
    instance: the detector's boxes (best ``top_k``), then the sidecar boxes (label ``"prompt"``, score
    1.0); an image with points but no box at all has one points-only instance (label ``"prompt"``,
    score 1.0, no entry in ``boxes``). A row with sidecar prompts is never ``no_detection``.
    """

    stage = "detect"

    def __init__(self, spec: DetectSpec, runtime: RuntimeSpec, models_dir: str | None = None):
        self.spec = spec
        self.device, self.dtype, self.loaded, self.backend = load_stage_model(
            self.stage, spec.model, runtime, models_dir, DETECT_BACKENDS
        )
        self.queries = spec.texts
        self.thresholds = np.asarray(spec.thresholds(), np.float32)

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        # 1. Every row gets the output columns; rows that already failed pass through.
        boxes = ensure_column(batch, "boxes", lambda: np.zeros((0, 4), np.float32))
        labels = ensure_column(batch, "labels", list)
        scores = ensure_column(batch, "det_scores", lambda: np.zeros((0,), np.float32))
        rows = active(batch)

        def detect(idx: list[int]) -> None:
            # 2. One batch of images x queries through the model, at the lowest query threshold.
            images = [batch["image"][i] for i in idx]
            results = self.backend(images, self.queries, float(self.thresholds.min()))
            pboxes, ppoints = batch.get("prompt_boxes"), batch.get("prompt_points")
            for i, im, res in zip(idx, images, results, strict=True):
                b, s, lab = self._select(res, im.shape[0], im.shape[1])
                boxes[i], labels[i], scores[i] = merge_instances(
                    b,
                    [self.queries[j] for j in lab],
                    s,
                    None if pboxes is None else pboxes[i],
                    None if ppoints is None else ppoints[i],
                )
                if len(labels[i]) == 0:
                    batch["status"][i] = "no_detection"

        with timed(batch, self.stage, rows):
            run_with_fallback(batch, rows, self.stage, detect)
        return batch

    def _select(self, res: Detections, h: int, w: int) -> Detections:
        """Per-query thresholds, clip to the image, drop degenerate boxes, keep the ``top_k`` best by score."""
        b, s, lab = (np.array(x) for x in res)  # copies: backends may hand read-only views
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        keep = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1) & (s >= self.thresholds[lab])
        b, s, lab = b[keep], s[keep], lab[keep]
        order = np.argsort(-s, kind="stable")[: self.spec.top_k]
        return b[order], s[order], lab[order]
