"""Result rows -> files named by row id (atomic), and the slim manifest columns (CPU).

edit / remove: ``images/<id>.png`` (edited image, alpha restored) and ``masks/<id>.png`` (blend weights);
rows that failed quality control go to ``rejected/<id>.png``. segment: ``masks/<id>.png``, an instance
label map (0 = background, k = instance k, in manifest order; 16-bit when there are more than 255
instances) plus COCO RLE per instance in the manifest. detect: no files, boxes in the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from promptpaint.actors.common import ERROR_COLUMNS, Batch, active, ensure_column, jsonable, timed
from promptpaint.coco import encode_rle
from promptpaint.config import WriteSpec
from promptpaint.io import IMAGE_SUFFIX, atomic_write, encode_image, encode_mask_png, join

# Columns that leave the worker for the manifest; pixel columns stay behind.
MANIFEST_COLUMNS = (
    "id",
    "path",
    "status",
    *ERROR_COLUMNS,
    "output_path",
    "mask_path",
    "seed",
    "width",
    "height",
    "boxes",
    "labels",
    "det_scores",
    "mask_scores",
    "mask_area",
    "instances",
    "crop",
    "crops",
    "edit_prompts",
    "rles",
    "clip_scores",
    "clip_score",
    "node",
)
JSON_COLUMNS = ("boxes", "labels", "det_scores", "mask_scores", "crop", "crops", "edit_prompts", "rles", "clip_scores")
TIMING_STAGES = ("read", "detect", "segment", "mask", "inpaint", "score", "write")
# For rows (or whole batches) that never reached the stage producing a column.
_DEFAULTS: dict[str, Any] = {"seed": 0, "width": 0, "height": 0, "mask_area": 0, "instances": 0, "clip_score": 0.0}
_DEFAULTS["node"] = ""
_DEFAULTS.update({c: [] for c in JSON_COLUMNS})


def blend_to_mask_png(blend: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1] -> (H, W) uint8, rounded *up* so that 0 means 'pixel untouched'."""
    return np.ceil(blend * 255.0).clip(0, 255).astype(np.uint8)


def utf8_safe(v: Any) -> Any:
    """Strings that Arrow and PNG text can store: a non-UTF-8 file name (lone surrogates after
    ``os.fsdecode``) is kept readable with its odd bytes written as ``\\xNN``; other values pass through."""
    if not isinstance(v, str):
        return v
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        try:
            return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return v.encode("utf-8", "backslashreplace").decode("utf-8")


def label_map(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool instance masks -> (H, W) label image: 0 background, k+1 where instance k is.

    uint8 up to 255 instances, else uint16. Where instances overlap the later one wins (every mask is
    also in the manifest as RLE, exactly).
    """
    n, h, w = masks.shape
    out = np.zeros((h, w), np.uint8 if n <= 255 else np.uint16)
    for k in range(n):
        out[masks[k]] = k + 1
    return out


class Writer:
    """Write ``images/<name>.<ext>`` (alpha restored) and ``masks/<name>.png``, then reduce to manifest columns.

    Batch in:  every column of the earlier stages; ``name`` (the output name from the input's path, see
               ``io.output_names``) when ``write.naming`` is ``input``
    Batch out: MANIFEST_COLUMNS (lists and arrays as JSON strings) + t_<stage>_ms
    Output names derive from the input path (or the row id) and writes go through a temporary name, so a
    retried task rewrites the same bytes to the same names instead of producing a second copy.
    """

    stage = "write"

    def __init__(
        self, output: str, png_text: dict[str, str] | None = None, mode: str = "edit", write: WriteSpec | None = None
    ):
        self.output = output
        self.png_text = dict(png_text or {})
        self.mode = mode
        self.write = write or WriteSpec()

    def _name(self, batch: Batch, i: int) -> str:
        if self.write.naming == "input" and "name" in batch and batch["name"][i]:
            return utf8_safe(str(batch["name"][i]))
        return batch["id"][i]

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        ensure_column(batch, "output_path", str)
        ensure_column(batch, "mask_path", str)
        rows = active(batch)
        if self.mode in ("edit", "remove"):
            rows += [i for i, s in enumerate(batch["status"]) if s == "qc_failed"]
        with timed(batch, self.stage, rows):
            for i in rows:
                {"detect": self._detected, "segment": self._segmented}.get(self.mode, self._edited)(batch, i)
        slim: Batch = {}
        for col in MANIFEST_COLUMNS:
            values = batch[col] if col in batch else [_DEFAULTS.get(col, "")] * n
            slim[col] = (
                [json.dumps(jsonable(v)) for v in values] if col in JSON_COLUMNS else [utf8_safe(v) for v in values]
            )
        for stage in TIMING_STAGES:
            slim[f"t_{stage}_ms"] = [float(x) for x in batch.get(f"t_{stage}_ms", [0.0] * n)]
        return slim

    def _edited(self, batch: Batch, i: int) -> None:
        row_id = batch["id"][i]
        alpha = batch["alpha"][i]
        prompts = batch.get("edit_prompts")
        # No input path in the file: inputs with identical bytes share an id and so this file, and the path
        # stamped would be whichever row was written last. The bytes depend on (input bytes, spec) only; the
        # manifest maps the id to every input path it came from.
        text = {**self.png_text, "promptpaint:id": row_id, "promptpaint:seed": str(batch["seed"][i])}
        if prompts is not None:
            text["promptpaint:edit_prompts"] = json.dumps(list(prompts[i]))
        folder = "rejected" if batch["status"][i] == "qc_failed" else "images"
        name, w = self._name(batch, i), self.write
        img_uri = join(self.output, folder, name + IMAGE_SUFFIX[w.format])
        msk_uri = join(self.output, "masks", f"{name}.png")
        data = encode_image(
            batch["edited"][i],
            alpha if alpha.size else None,
            text,
            w.format,
            w.quality,
            w.lossless,
            w.png_compress_level,
        )
        atomic_write(img_uri, data)
        atomic_write(msk_uri, encode_mask_png(blend_to_mask_png(batch["blend"][i])))
        batch["output_path"][i], batch["mask_path"][i] = img_uri, msk_uri
        if not batch["status"][i]:
            batch["status"][i] = "edited"

    def _segmented(self, batch: Batch, i: int) -> None:
        masks = np.asarray(batch["masks"][i], bool)
        msk_uri = join(self.output, "masks", f"{self._name(batch, i)}.png")
        atomic_write(msk_uri, encode_mask_png(label_map(masks)))
        rles = ensure_column(batch, "rles", list)
        rles[i] = [encode_rle(m) for m in masks]
        ensure_column(batch, "mask_area", lambda: 0)[i] = int(masks.any(0).sum()) if len(masks) else 0
        ensure_column(batch, "instances", lambda: 0)[i] = len(masks)
        batch["mask_path"][i] = msk_uri
        batch["status"][i] = "segmented"

    def _detected(self, batch: Batch, i: int) -> None:
        ensure_column(batch, "instances", lambda: 0)[i] = len(batch["labels"][i])
        batch["status"][i] = "detected"
