"""Edited rows -> PNG files named by row id (atomic), and the slim manifest columns (CPU)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from promptpaint.actors.common import ERROR_COLUMNS, Batch, active, ensure_column, timed
from promptpaint.io import atomic_write, encode_mask_png, encode_png, join

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
)
JSON_COLUMNS = ("boxes", "labels", "det_scores", "mask_scores", "crop")
TIMING_STAGES = ("read", "detect", "segment", "mask", "inpaint", "write")
# For rows (or whole batches) that never reached the stage producing a column.
_DEFAULTS: dict[str, Any] = {"seed": 0, "width": 0, "height": 0, "mask_area": 0, "instances": 0}
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


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


class Writer:
    """Write ``images/<id>.png`` (alpha restored) and ``masks/<id>.png``, then reduce to manifest columns.

    Batch in:  every column of the earlier stages
    Batch out: MANIFEST_COLUMNS (lists and arrays as JSON strings) + t_<stage>_ms
    Output names derive from the row id and writes go through a temporary name, so a retried task
    rewrites the same bytes to the same names instead of producing a second copy.
    """

    stage = "write"

    def __init__(self, output: str, png_text: dict[str, str] | None = None):
        self.output = output
        self.png_text = dict(png_text or {})

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        out_path = ensure_column(batch, "output_path", str)
        mask_path = ensure_column(batch, "mask_path", str)
        rows = active(batch)
        with timed(batch, self.stage, rows):
            for i in rows:
                row_id = batch["id"][i]
                alpha = batch["alpha"][i]
                text = {
                    **self.png_text,
                    "promptpaint:id": row_id,
                    "promptpaint:seed": str(batch["seed"][i]),
                    "promptpaint:input_path": utf8_safe(batch["path"][i]),
                }
                img_uri = join(self.output, "images", f"{row_id}.png")
                msk_uri = join(self.output, "masks", f"{row_id}.png")
                atomic_write(img_uri, encode_png(batch["edited"][i], alpha if alpha.size else None, text))
                atomic_write(msk_uri, encode_mask_png(blend_to_mask_png(batch["blend"][i])))
                out_path[i], mask_path[i] = img_uri, msk_uri
                batch["status"][i] = "edited"
        slim: Batch = {}
        for col in MANIFEST_COLUMNS:
            values = batch[col] if col in batch else [_DEFAULTS.get(col, "")] * n
            slim[col] = (
                [json.dumps(_jsonable(v)) for v in values] if col in JSON_COLUMNS else [utf8_safe(v) for v in values]
            )
        for stage in TIMING_STAGES:
            slim[f"t_{stage}_ms"] = [float(x) for x in batch.get(f"t_{stage}_ms", [0.0] * n)]
        return slim
