"""Text queries -> boxes with an open-vocabulary detector (the model family supplies the backend)."""

from __future__ import annotations

import numpy as np
import torch

from promptpaint.actors.common import Batch, active, ensure_column, load_stage_model, run_with_fallback, timed
from promptpaint.actors.prompts import merge_instances
from promptpaint.config import DetectSpec, RuntimeSpec
from promptpaint.models.base import Detections


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
            self.stage, spec.model, runtime, models_dir
        )
        self.configure(spec)

    def configure(self, spec: DetectSpec) -> None:
        """New queries / thresholds / top_k for the loaded model (the server sets them per request group)."""
        if spec.model != self.spec.model:
            raise ValueError(f"detect.model {spec.model!r} is not the loaded {self.spec.model!r}")
        self.spec = spec
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
