"""Boxes -> instance masks with SAM."""

from __future__ import annotations

import numpy as np
import torch

from promptpaint.actors.common import Batch, active, ensure_column, run_with_fallback, timed
from promptpaint.config import RuntimeSpec, SegmentSpec
from promptpaint.models import load_model


def box_masks(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, 4) xyxy px -> (N, H, W) bool, True inside each box (rounded outward)."""
    out = np.zeros((len(boxes), h, w), bool)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64)):
        out[k, int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return out


class Segmenter:
    """Box-prompted segmentation.

    Batch in:  image list[(H, W, 3) uint8], boxes list[(N, 4) float32 xyxy px]
    Batch out: + masks list[(N, H, W) bool], mask_scores list[(N,) float32] (SAM's predicted IoU)

    ``multimask``: ``best`` asks SAM for 3 candidates per box and keeps the highest predicted IoU,
    ``largest`` keeps the largest candidate, ``single`` asks for one mask.
    """

    stage = "segment"

    def __init__(self, spec: SegmentSpec, runtime: RuntimeSpec, models_dir: str | None = None):
        self.spec = spec
        self.device, self.dtype = runtime.resolve()
        self.loaded = load_model(spec.model, models_dir, self.device, self.dtype)
        if self.loaded.entry.task != "segment":
            raise ValueError(
                f"segment.model={spec.model!r} is a {self.loaded.entry.task} model; "
                "pick a segmenter (see `promptpaint models list`)"
            )
        self.processor, self.model = self.loaded.processor, self.loaded.model

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        masks = ensure_column(batch, "masks", lambda: np.zeros((0, 0, 0), bool))
        mscores = ensure_column(batch, "mask_scores", lambda: np.zeros((0,), np.float32))
        rows = [i for i in active(batch) if len(batch["boxes"][i])]

        def segment(idx: list[int]) -> None:
            images = [batch["image"][i] for i in idx]
            # SAM's processor wants the same number of boxes per image: pad with copies of the first
            # box and drop the extra masks afterwards.
            counts = [len(batch["boxes"][i]) for i in idx]
            n_max = max(counts)
            prompts = []
            for i, n in zip(idx, counts, strict=True):
                b = np.asarray(batch["boxes"][i], np.float32)
                prompts.append(np.concatenate([b, np.repeat(b[:1], n_max - n, 0)]).tolist())
            inputs = self.processor(images=images, input_boxes=prompts, return_tensors="pt")
            multimask = self.spec.multimask != "single"
            out = self.model(
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                multimask_output=multimask,
            )
            # (B, N, M, h, w) low-res logits -> list of (N, M, H, W) bool at the original size
            full = self.processor.image_processor.post_process_masks(
                out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
            iou = out.iou_scores.float().cpu().numpy()
            for k, (i, n) in enumerate(zip(idx, counts, strict=True)):
                cand = full[k][:n].numpy().astype(bool)  # (N, M, H, W)
                pick = self._pick(cand, iou[k, :n])
                masks[i] = cand[np.arange(n), pick]
                if self.spec.clip_to_box:
                    masks[i] &= box_masks(batch["boxes"][i], *cand.shape[-2:])
                mscores[i] = iou[k, np.arange(n), pick].astype(np.float32)

        with timed(batch, self.stage, rows):
            run_with_fallback(batch, rows, self.stage, segment)
        return batch

    def _pick(self, cand: np.ndarray, iou: np.ndarray) -> np.ndarray:
        """Index of the kept candidate per instance: (N, M, H, W), (N, M) -> (N,) int."""
        if cand.shape[1] == 1:
            return np.zeros(cand.shape[0], np.int64)
        if self.spec.multimask == "largest":
            return cand.reshape(cand.shape[0], cand.shape[1], -1).sum(-1).argmax(1)
        return iou.argmax(1)
