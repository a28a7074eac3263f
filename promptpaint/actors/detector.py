"""Text queries -> boxes with an open-vocabulary detector (OWLv2 / OWL-ViT)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from promptpaint.actors.common import Batch, active, ensure_column, run_with_fallback, timed
from promptpaint.actors.prompts import merge_instances
from promptpaint.config import DetectSpec, RuntimeSpec
from promptpaint.models import load_model, owl_target_size


class Detector:
    """Open-vocabulary detection.

    Batch in:  image list[(H, W, 3) uint8]; optional prompt_boxes / prompt_points (the ``prompts`` stage)
    Batch out: + boxes list[(N, 4) float32 xyxy pixels], labels list[list[str]], det_scores list[(N,) float32]
               rows with no box above ``threshold`` get status ``no_detection``.

    With sidecar prompts (``promptpaint.actors.prompts``), labels and det_scores hold one entry per
    instance: the detector's boxes (best ``top_k``), then the sidecar boxes (label ``"prompt"``, score
    1.0); an image with points but no box at all has one points-only instance (label ``"prompt"``,
    score 1.0, no entry in ``boxes``). A row with sidecar prompts is never ``no_detection``.
    """

    stage = "detect"

    def __init__(self, spec: DetectSpec, runtime: RuntimeSpec, models_dir: str | None = None):
        self.spec = spec
        self.device, self.dtype = runtime.resolve()
        self.loaded = load_model(spec.model, models_dir, self.device, self.dtype, task="detect")
        self.processor, self.model = self.loaded.processor, self.loaded.model
        self.family = self.loaded.entry.family

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        # 1. Every row gets the output columns; rows that already failed pass through.
        boxes = ensure_column(batch, "boxes", lambda: np.zeros((0, 4), np.float32))
        labels = ensure_column(batch, "labels", list)
        scores = ensure_column(batch, "det_scores", lambda: np.zeros((0,), np.float32))
        rows = active(batch)

        def detect(idx: list[int]) -> None:
            # 2. One padded batch of images x queries through the model.
            images = [batch["image"][i] for i in idx]
            queries = list(self.spec.queries)
            inputs = self.processor(text=[queries] * len(images), images=images, return_tensors="pt")
            inputs = {k: self._to_device(k, v) for k, v in inputs.items()}
            outputs = self.model(**inputs)
            # 3. Back to pixel boxes of the original image (OWLv2 pads to a square first).
            sizes = [owl_target_size(im.shape[0], im.shape[1], self.family) for im in images]
            results = self.processor.post_process_grounded_object_detection(
                outputs=outputs, threshold=self.spec.threshold, target_sizes=sizes
            )
            pboxes, ppoints = batch.get("prompt_boxes"), batch.get("prompt_points")
            for i, im, res in zip(idx, images, results, strict=True):
                b, s, lab = self._select(res, im.shape[0], im.shape[1])
                boxes[i], labels[i], scores[i] = merge_instances(
                    b,
                    [queries[j] for j in lab],
                    s,
                    None if pboxes is None else pboxes[i],
                    None if ppoints is None else ppoints[i],
                )
                if len(labels[i]) == 0:
                    batch["status"][i] = "no_detection"

        with timed(batch, self.stage, rows):
            run_with_fallback(batch, rows, self.stage, detect)
        return batch

    def _to_device(self, key: str, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return v.to(self.device, self.dtype)
        return v.to(self.device)

    def _select(self, res: dict[str, Any], h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clip to the image, drop degenerate boxes, keep the ``top_k`` best by score."""
        b = res["boxes"].float().cpu().numpy().astype(np.float32).reshape(-1, 4)
        s = res["scores"].float().cpu().numpy().astype(np.float32).reshape(-1)
        lab = res["labels"].cpu().numpy().astype(np.int64).reshape(-1)
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        keep = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
        b, s, lab = b[keep], s[keep], lab[keep]
        order = np.argsort(-s, kind="stable")[: self.spec.top_k]
        return b[order], s[order], lab[order]
