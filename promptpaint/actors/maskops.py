"""Instance masks -> one edit mask and its feathered blend weights (CPU, numpy/scipy)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from promptpaint.actors.common import Batch, active, ensure_column, timed
from promptpaint.config import MaskSpec


def select_instances(masks: np.ndarray, det_scores: np.ndarray, spec: MaskSpec) -> np.ndarray:
    """Pick instances by policy after dropping those under ``min_area``.

    masks (N, H, W) bool, det_scores (N,) -> indices (K,) int, K <= N (K may be 0).
    """
    areas = masks.reshape(len(masks), -1).sum(1)
    keep = np.flatnonzero(areas >= max(spec.min_area, 1))
    if len(keep) == 0 or spec.instances == "all":
        return keep
    if spec.instances == "largest":
        return keep[[int(np.argmax(areas[keep]))]]
    return keep[[int(np.argmax(det_scores[keep]))]]  # top1 by detection score


def dilate_and_feather(mask: np.ndarray, dilate_px: int, feather_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Grow a mask by ``dilate_px`` and ramp it to zero over ``feather_px`` more pixels.

    mask (H, W) bool -> (dilated (H, W) bool, blend (H, W) float32 in [0, 1]).
    ``blend`` is 1 on the dilated mask, falls linearly with the Euclidean distance beyond it and is
    exactly 0 at ``dilate_px + feather_px + 1`` px or more from the mask: the support is bounded, so the
    pixels outside it can be copied bit-exactly from the input.
    """
    h, w = mask.shape
    reach = dilate_px + feather_px + 1
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros_like(mask), np.zeros(mask.shape, np.float32)
    # Work in a window around the mask only: the distance transform is the costly part.
    y0, y1 = max(ys.min() - reach, 0), min(ys.max() + reach + 1, h)
    x0, x1 = max(xs.min() - reach, 0), min(xs.max() + reach + 1, w)
    win = mask[y0:y1, x0:x1]
    dist = ndimage.distance_transform_edt(~win)  # 0 on the mask, px to the nearest mask pixel elsewhere
    dilated = np.zeros_like(mask)
    blend = np.zeros(mask.shape, np.float32)
    dilated[y0:y1, x0:x1] = dist <= dilate_px
    ramp = 1.0 - (dist - dilate_px) / (feather_px + 1) if feather_px else (dist <= dilate_px).astype(np.float64)
    blend[y0:y1, x0:x1] = np.clip(ramp, 0.0, 1.0).astype(np.float32)
    return dilated, blend


def group_instances(labels: list[str], keep: np.ndarray, prompt_of: dict[str, tuple[str, str]] | None) -> list:
    """Kept instances -> ``[(prompt pair or None, instance indices), ...]``, one entry per inpaint pass.

    Instances whose labels map to the same (prompt, negative prompt) share a pass; passes come in the
    order of ``prompt_of`` (the queries' order, sidecar ``prompt`` last). Without ``prompt_of`` (or with
    labels it does not know) everything is one pass with the inpainter's default prompts.
    """
    if not prompt_of or len(labels) <= int(np.max(keep)) or any(labels[k] not in prompt_of for k in keep):
        return [(None, keep)]
    order = {pair: n for n, pair in enumerate(dict.fromkeys(prompt_of.values()))}
    groups: dict[tuple[str, str], list[int]] = {}
    for k in keep:
        groups.setdefault(prompt_of[labels[k]], []).append(int(k))
    return [(pair, np.asarray(idx)) for pair, idx in sorted(groups.items(), key=lambda kv: order[kv[0]])]


class MaskOps:
    """Merge instance masks into the edit mask(s).

    Batch in:  masks list[(N, H, W) bool], det_scores list[(N,) float32]; labels list[list[str]] when
               per-query prompts are used
    Batch out: + mask list[(H, W) bool] (after fill/invert/dilate), blend list[(H, W) float32 in [0, 1]],
               mask_area list[int], instances list[int]; pass_blends list[list[(H, W) float32]] and
               pass_prompts list[list[[prompt, negative]]] -- one entry per inpaint pass (queries with
               different prompts are repainted in separate passes, each over its own objects only; one
               pass and no pass_prompts entry when ``prompt_of`` is not given). ``mask``/``blend`` are the
               union of the passes. A row whose mask ends up empty gets status ``no_detection``.

    ``invert`` repaints everything except the objects, which has no per-query meaning: it makes one pass.
    """

    stage = "mask"

    def __init__(self, spec: MaskSpec, prompt_of: dict[str, tuple[str, str]] | None = None):
        self.spec = spec
        self.prompt_of = None if spec.invert else prompt_of

    def __call__(self, batch: Batch) -> Batch:
        out_mask = ensure_column(batch, "mask", lambda: np.zeros((0, 0), bool))
        out_blend = ensure_column(batch, "blend", lambda: np.zeros((0, 0), np.float32))
        area = ensure_column(batch, "mask_area", lambda: 0)
        n_inst = ensure_column(batch, "instances", lambda: 0)
        pass_blends = ensure_column(batch, "pass_blends", list)
        pass_prompts = ensure_column(batch, "pass_prompts", list)
        labels = batch.get("labels")
        rows = active(batch)
        with timed(batch, self.stage, rows):
            for i in rows:
                masks = np.asarray(batch["masks"][i], bool)
                keep = select_instances(masks, np.asarray(batch["det_scores"][i]), self.spec)
                if len(keep) == 0:
                    batch["status"][i] = "no_detection"
                    batch["error_message"][i] = f"no instance reaches mask.min_area={self.spec.min_area} px"
                    continue
                groups = group_instances(list(labels[i]) if labels is not None else [], keep, self.prompt_of)
                dilated_all, blends, prompts = np.zeros(masks.shape[1:], bool), [], []
                for pair, idx in groups:
                    dilated, blend = self._merge(masks[idx])
                    if dilated.any():
                        dilated_all |= dilated
                        blends.append(blend)
                        if pair is not None:
                            prompts.append(list(pair))
                if not blends:
                    batch["status"][i] = "no_detection"
                    batch["error_message"][i] = "the mask is empty after mask.invert"
                    continue
                out_mask[i] = dilated_all
                out_blend[i] = blends[0] if len(blends) == 1 else np.maximum.reduce(blends)
                pass_blends[i], pass_prompts[i] = blends, prompts
                area[i], n_inst[i] = int(dilated_all.sum()), len(keep)
                batch["masks"][i] = np.zeros((0, 0, 0), bool)  # instance masks are no longer needed
        return batch

    def _merge(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, H, W) bool instances -> (dilated edit mask (H, W) bool, blend (H, W) float32)."""
        m = masks.any(0)
        if self.spec.fill_holes:
            m = ndimage.binary_fill_holes(m)
        if self.spec.invert:
            m = ~m
        return dilate_and_feather(m, self.spec.dilate_px, self.spec.feather_px)
