"""Boxes and points -> instance masks with SAM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from promptpaint.actors.common import Batch, active, ensure_column, load_stage_model, run_with_fallback, timed
from promptpaint.actors.prompts import InstancePrompt, instance_prompts
from promptpaint.actors.ultralytics_backends import FastSamBackend, UltralyticsSamBackend
from promptpaint.config import RuntimeSpec, SegmentSpec
from promptpaint.models import LoadedModel


def box_masks(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, 4) xyxy px -> (N, H, W) bool, True inside each box (rounded outward)."""
    out = np.zeros((len(boxes), h, w), bool)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64)):
        out[k, int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return out


@dataclass
class SamCall:
    """One SAM prompt-decoder call: the instances of one prompt kind across a batch of images.

    ``rows`` index the images of the batch that take part; ``instances[b]`` lists, for ``rows[b]``, which
    of that image's instances fill the first ``len(instances[b])`` slots (the remaining slots repeat the
    first instance and are dropped). Arrays are in original-image pixels:
    input_boxes (B, N, 4) float32 or None, input_points (B, N, P, 2) float32 and input_labels (B, N, P)
    int64, or None when the kind has no points.
    """

    has_box: bool
    n_points: int
    rows: list[int]
    instances: list[list[int]]
    input_boxes: np.ndarray | None
    input_points: np.ndarray | None
    input_labels: np.ndarray | None


def build_sam_prompts(per_image: list[list[InstancePrompt]]) -> list[SamCall]:
    """Per-image instance prompts -> SAM calls, one per prompt kind (has a box, number of points).

    SAM's prompt encoder takes ``input_boxes`` for every instance of a call or for none, and its
    decoder has no attention mask: a padding point (label -10, what ``SamProcessor`` pads ragged point
    lists with) still enters the decoder as a zero token and shifts the masks. So instead of padding,
    instances are grouped by kind; inside a call only the instance count differs between images, padded
    with copies of the image's first instance (a copy of a prompt is an independent, identical query).
    A batch with detector boxes only is one call, exactly the box-only call SAM always got.
    """
    groups: dict[tuple[bool, int], dict[int, list[int]]] = {}
    for r, prompts in enumerate(per_image):
        for j, p in enumerate(prompts):
            groups.setdefault(p.kind, {}).setdefault(r, []).append(j)
    calls = []
    for (has_box, n_points), by_row in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        rows = sorted(by_row)
        n_max = max(len(v) for v in by_row.values())
        boxes, points, labels = [], [], []
        for r in rows:
            js = by_row[r]
            slots = [per_image[r][j] for j in js] + [per_image[r][js[0]]] * (n_max - len(js))
            if has_box:
                boxes.append(np.stack([p.box for p in slots]).astype(np.float32))
            if n_points:
                points.append(np.stack([p.points for p in slots]).astype(np.float32))
                labels.append(np.stack([p.labels for p in slots]).astype(np.int64))
        calls.append(
            SamCall(
                has_box=has_box,
                n_points=n_points,
                rows=rows,
                instances=[by_row[r] for r in rows],
                input_boxes=np.stack(boxes) if has_box else None,
                input_points=np.stack(points) if n_points else None,
                input_labels=np.stack(labels) if n_points else None,
            )
        )
    return calls


def to_model_coords(xy: np.ndarray, original_size: tuple[int, int], reshaped_size: tuple[int, int]) -> np.ndarray:
    """Pixel x/y pairs (..., 2k) of an (h, w) image -> SAM's resized frame, as ``SamProcessor`` scales them."""
    (old_h, old_w), (new_h, new_w) = original_size, reshaped_size
    out = np.asarray(xy, np.float64).copy()
    out[..., 0::2] *= new_w / old_w
    out[..., 1::2] *= new_h / old_h
    return out


# Per image: candidate masks (I, M, H, W) bool at the original size and their scores (I, M) float32,
# one row per instance prompt (in order), M candidates each (M = 1 when one mask is asked for).
Candidates = tuple[np.ndarray, np.ndarray]


class SegmentBackend(Protocol):
    """One model family's prompted segmenter."""

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]: ...


class SamBackend:
    """SAM through transformers: the image encoder once per image, one decoder call per prompt kind."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.processor, self.model = loaded.processor, loaded.model
        self.device, self.dtype = device, dtype

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]:
        inputs = self.processor(images=images, return_tensors="pt")
        orig = inputs["original_sizes"]
        resized = inputs["reshaped_input_sizes"]
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
        cand: list[list[np.ndarray]] = [[None] * len(p) for p in per_image]  # (M, H, W) per instance
        ious: list[list[np.ndarray]] = [[None] * len(p) for p in per_image]  # (M,) per instance
        for call in build_sam_prompts(per_image):
            sel = call.rows
            kwargs = {}
            if call.input_boxes is not None:
                kwargs["input_boxes"] = self._coords(call.input_boxes, orig, resized, sel)
            if call.input_points is not None:
                kwargs["input_points"] = self._coords(call.input_points, orig, resized, sel)
                kwargs["input_labels"] = torch.from_numpy(call.input_labels).to(self.device)
            emb = embeddings if len(sel) == len(images) else embeddings[sel]
            out = self.model(image_embeddings=emb, multimask_output=multimask, **kwargs)
            # (B, N, M, h, w) low-res logits -> list of (N, M, H, W) bool at the original size
            full = self.processor.image_processor.post_process_masks(
                out.pred_masks.float().cpu(), orig[sel], resized[sel]
            )
            iou = out.iou_scores.float().cpu().numpy()
            for b, (r, js) in enumerate(zip(sel, call.instances, strict=True)):
                m = full[b].numpy().astype(bool)
                for n, j in enumerate(js):
                    cand[r][j], ious[r][j] = m[n], iou[b, n]
        return [(np.stack(c), np.stack(s).astype(np.float32)) for c, s in zip(cand, ious, strict=True)]

    def _coords(self, xy: np.ndarray, orig: torch.Tensor, resized: torch.Tensor, sel: list[int]) -> torch.Tensor:
        """(B, ..., 2k) pixel coordinates of the images ``sel`` -> SAM-frame tensor on the model's device."""
        scaled = np.stack(
            [
                to_model_coords(x, tuple(orig[r].tolist()), tuple(resized[r].tolist()))
                for x, r in zip(xy, sel, strict=True)
            ]
        )
        return torch.from_numpy(scaled).to(self.device, self.dtype)


# family -> backend constructor (loaded model, device, dtype). A new segmenter family registers here.
SEGMENT_BACKENDS: dict[str, Callable[[LoadedModel, torch.device, torch.dtype], SegmentBackend]] = {
    "sam": SamBackend,
    "ultralytics-sam": UltralyticsSamBackend,
    "fastsam": FastSamBackend,
}


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
            self.stage, spec.model, runtime, models_dir, SEGMENT_BACKENDS
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
