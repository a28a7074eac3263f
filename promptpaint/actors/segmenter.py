"""Boxes and points -> instance masks with a prompted segmenter (SAM, MobileSAM, FastSAM)."""

from __future__ import annotations

import numpy as np
import torch

from promptpaint.actors.common import Batch, active, ensure_column, load_stage_model, run_with_fallback, timed
from promptpaint.actors.prompts import InstancePrompt, instance_prompts
from promptpaint.config import RuntimeSpec, SegmentSpec


def box_masks(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, 4) xyxy px -> (N, H, W) bool, True inside each box (rounded outward)."""
    out = np.zeros((len(boxes), h, w), bool)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64)):
        out[k, int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return out


class Segmenter:
    """Box- and point-prompted segmentation.

    Batch in:  image list[(H, W, 3) uint8], boxes list[(N, 4) float32 xyxy px]; optional prompt_points
               list[(P, 2) float32 xy px] and prompt_labels list[(P,) int64] (the ``prompts`` stage)
    Batch out: + masks list[(I, H, W) bool], mask_scores list[(I,) float32] (the model's quality score:
               SAM's predicted IoU)

    One instance per box, prompted by the box and the sidecar points inside it; an image with points
    and no box has one instance prompted by all its points, after the box instances (so I = N, or 1
    for a points-only image). ``clip_to_box`` applies to box-prompted instances only.

    ``multimask``: ``best`` asks the model for several candidates per instance (3 for SAM) and keeps the
    highest score, ``largest`` keeps the largest candidate, ``single`` asks for one mask, ``all`` keeps
    every candidate as an instance of its own: instance k's M candidates become instances k*M .. k*M+M-1,
    and ``labels``, ``det_scores`` and ``boxes`` are repeated to match, so every column stays aligned.
    """

    stage = "segment"

    def __init__(self, spec: SegmentSpec, runtime: RuntimeSpec, models_dir: str | None = None):
        self.spec = spec
        self.device, self.dtype, self.loaded, self.backend = load_stage_model(
            self.stage, spec.model, runtime, models_dir
        )

    def prompts(self, batch: Batch, i: int) -> list[InstancePrompt]:
        points, labels = batch.get("prompt_points"), batch.get("prompt_labels")
        return instance_prompts(
            batch["boxes"][i], None if points is None else points[i], None if labels is None else labels[i]
        )

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        masks = ensure_column(batch, "masks", lambda: np.zeros((0, 0, 0), bool))
        mscores = ensure_column(batch, "mask_scores", lambda: np.zeros((0,), np.float32))
        per_row = {i: self.prompts(batch, i) for i in active(batch)}
        rows = [i for i, p in per_row.items() if p]
        # Per-instance columns as the detector left them (``all`` repeats them; a retry must start from these).
        detected = {
            i: (
                list(batch["labels"][i]) if "labels" in batch else [],
                batch["det_scores"][i] if "det_scores" in batch else np.zeros(0, np.float32),
                batch["boxes"][i],
            )
            for i in (rows if self.spec.multimask == "all" else [])
        }

        def segment(idx: list[int]) -> None:
            images = [batch["image"][i] for i in idx]
            per_image = [per_row[i] for i in idx]
            results = self.backend(images, per_image, self.spec.multimask != "single")
            for r, (i, (c, s)) in enumerate(zip(idx, results, strict=True)):
                boxed = [j for j, p in enumerate(per_image[r]) if p.box is not None]
                if self.spec.multimask == "all":
                    self._keep_all(batch, i, c, s, boxed, detected[i])
                    continue
                n = len(c)
                pick = self._pick(c, s)
                masks[i] = c[np.arange(n), pick]
                if self.spec.clip_to_box and boxed:
                    boxes = np.stack([per_image[r][j].box for j in boxed])
                    masks[i][boxed] &= box_masks(boxes, *c.shape[-2:])
                mscores[i] = s[np.arange(n), pick].astype(np.float32)

        with timed(batch, self.stage, rows):
            run_with_fallback(batch, rows, self.stage, segment)
        return batch

    def _keep_all(
        self, batch: Batch, i: int, cand: np.ndarray, iou: np.ndarray, boxed: list[int], detected: tuple
    ) -> None:
        """Every candidate an instance: (N, M, H, W) -> masks (N*M, H, W), per-instance columns repeated M times."""
        n, m = cand.shape[:2]
        labels, det_scores, boxes = detected
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        c = cand.copy()
        if self.spec.clip_to_box and boxed:
            c[boxed] &= box_masks(boxes[boxed], *c.shape[-2:])[:, None]
        batch["masks"][i] = c.reshape(n * m, *c.shape[2:])
        batch["mask_scores"][i] = iou.reshape(n * m).astype(np.float32)
        if "labels" in batch:
            batch["labels"][i] = [lab for lab in labels for _ in range(m)]
        if "det_scores" in batch:
            batch["det_scores"][i] = np.repeat(np.asarray(det_scores, np.float32), m)
        batch["boxes"][i] = np.repeat(boxes, m, axis=0)

    def _pick(self, cand: np.ndarray, iou: np.ndarray) -> np.ndarray:
        """Index of the kept candidate per instance: (N, M, H, W), (N, M) -> (N,) int."""
        if cand.shape[1] == 1:
            return np.zeros(cand.shape[0], np.int64)
        if self.spec.multimask == "largest":
            return cand.reshape(cand.shape[0], cand.shape[1], -1).sum(-1).argmax(1)
        return iou.argmax(1)
