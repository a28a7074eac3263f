"""Edited images -> CLIP score of each edit pass against its prompt, and an optional QC threshold.

The score follows torchmetrics' ``CLIPScore`` definition, ``max(100 * cos(E_I, E_C), 0)``, per image-text
pair: torchmetrics' functional ``clip_score`` averages the per-pair values over its batch before clipping,
here every pass keeps its own score (a batch of one in torchmetrics' terms).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from promptpaint.actors.common import (
    Batch,
    active,
    ensure_column,
    load_stage_model,
    run_with_fallback,
    set_error,
    timed,
)
from promptpaint.config import QCSpec, RuntimeSpec


def check_row(edited: Any, crops: Any, prompts: Any) -> str | None:
    """Why a row cannot be scored (its columns break the batch contract), or None when it can."""
    if not isinstance(edited, np.ndarray) or edited.ndim != 3 or edited.shape[2] != 3 or edited.dtype != np.uint8:
        got = f"{type(edited).__name__} {getattr(edited, 'shape', '')} {getattr(edited, 'dtype', '')}".strip()
        return f"edited must be an (H, W, 3) uint8 image, got {got}"
    if len(crops) != len(prompts):
        return f"{len(crops)} crop windows but {len(prompts)} edit prompts: the inpainter must give one per pass"
    h, w = edited.shape[:2]
    for k, c in enumerate(crops):
        if len(c) != 4:
            return f"crop window {k} is {list(c)!r}; expected [y0, y1, x0, x1]"
        y0, y1, x0, x1 = (int(v) for v in c)
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            return f"crop window {k} {[y0, y1, x0, x1]} is empty or outside the {h}x{w} image"
    return None


class Scorer:
    """CLIP score of each edit pass: the window that pass repainted against that pass's prompt.

    Batch in:  edited list[(H, W, 3) uint8]; crops list[list[[y0, y1, x0, x1]]] (one window per edit pass,
               end-exclusive px); edit_prompts list[list[str]] (one prompt per pass, same length as
               ``crops[i]``); status (only active rows are scored)
    Batch out: + clip_scores list[(K,) float32] (one per pass, ``max(100 * cos, 0)``), clip_score list[float]
               (the lowest pass score; 0.0 for rows not scored or without passes)

    With ``spec.min_score`` set, an active row whose clip_score is below it gets status ``qc_failed``
    (error_stage ``score``, error_kind ``qc_failed``); its edited image is still there for the writer.
    ``spec.crop = False`` scores the whole edited image against every pass's prompt instead.
    All windows of the batch go through the model in one call, each distinct prompt encoded once.
    """

    stage = "score"

    def __init__(self, spec: QCSpec, runtime: RuntimeSpec, models_dir: str | None = None):
        self.spec = spec
        self.device, self.dtype, self.loaded, self.backend = load_stage_model(
            self.stage, spec.model, runtime, models_dir
        )

    def windows(self, batch: Batch, i: int) -> list[np.ndarray]:
        """The (h, w, 3) uint8 image each pass of row ``i`` is scored on (views, no copies)."""
        img = batch["edited"][i]
        if not self.spec.crop:
            return [img] * len(batch["crops"][i])
        return [img[int(y0) : int(y1), int(x0) : int(x1)] for y0, y1, x0, x1 in batch["crops"][i]]

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        # 1. Check the contract; rows that already failed pass through untouched.
        missing = [c for c in ("edited", "crops", "edit_prompts") if c not in batch]
        if missing:
            raise ValueError(f"the score stage needs columns {missing} from the inpaint stage; run it after inpaint")
        scores = ensure_column(batch, "clip_scores", lambda: np.zeros((0,), np.float32))
        score = ensure_column(batch, "clip_score", lambda: 0.0)
        rows = []
        for i in active(batch):
            problem = check_row(batch["edited"][i], batch["crops"][i], batch["edit_prompts"][i])
            if problem:
                set_error(batch, i, self.stage, "bad_input", problem)
            else:
                rows.append(i)

        # 2. One model call for every window of the batch (row by row only if that call fails).
        def score_rows(idx: list[int]) -> None:
            images, texts, owner = [], [], []
            for i in idx:
                images += self.windows(batch, i)
                texts += [str(p) for p in batch["edit_prompts"][i]]
                owner += [i] * len(batch["crops"][i])
            flat = self.backend(images, texts)
            owner_arr = np.asarray(owner, np.int64)
            for i in idx:
                scores[i] = flat[owner_arr == i].astype(np.float32)
                score[i] = float(scores[i].min()) if len(scores[i]) else 0.0

        with timed(batch, self.stage, rows):
            run_with_fallback(batch, rows, self.stage, score_rows)

        # 3. Quality gate. Not set_error: that marks the row "error", and a qc_failed image is still written.
        if self.spec.min_score is not None:
            for i in rows:
                if batch["status"][i] or not len(scores[i]) or score[i] >= self.spec.min_score:
                    continue
                worst = int(np.argmin(scores[i]))
                batch["status"][i] = "qc_failed"
                batch["error_stage"][i] = self.stage
                batch["error_kind"][i] = "qc_failed"
                batch["error_message"][i] = (
                    f"CLIP score {score[i]:.2f} < qc.min_score {self.spec.min_score:g} "
                    f"(pass {worst}, prompt {batch['edit_prompts'][i][worst]!r})"
                )[:2000]
        return batch
