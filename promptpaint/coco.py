"""COCO-format export of detect / segment jobs, and the mask RLE used in manifests.

Masks are stored as COCO *compressed* RLE (``{"size": [h, w], "counts": str}``), encoded and decoded by
pycocotools, the reference implementation every COCO tool reads. ``export`` turns a job's manifest into
one ``coco.json``: detection results (``bbox`` + ``score``) in ``detect`` mode, instance segmentation
(``segmentation`` RLE + ``area`` + ``bbox``) in ``segment`` mode.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from promptpaint import manifest
from promptpaint.io import atomic_write, join

COCO_FILE = "coco.json"
EXPORT_STATUSES = {"detect": "detected", "segment": "segmented"}


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO compressed RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO compressed RLE (counts as str or bytes) -> (H, W) bool."""
    counts = rle["counts"]
    obj = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(obj).astype(bool)


def rle_area_bbox(rle: dict[str, Any]) -> tuple[int, list[float]]:
    """Pixel area and COCO ``[x, y, w, h]`` box of an RLE mask."""
    obj = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(obj)), [float(x) for x in mask_utils.toBbox(obj)]


def _file_name(path: str, input_root: str) -> str:
    """Input path relative to the job's input folder when under it (COCO convention), else as listed."""
    root = input_root.rstrip("/")
    if "*" not in root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    if "*" in root:
        base = root.split("*", 1)[0].rsplit("/", 1)[0]
        if base and path.startswith(base + "/"):
            return path[len(base) + 1 :]
    return path


def build(rows: list[dict[str, Any]], mode: str, queries: list[str], input_root: str) -> dict[str, Any]:
    """Manifest rows (dicts) -> a COCO dataset dict (images, categories, annotations).

    Categories are the job's queries in order (ids 1..n), then ``prompt`` for sidecar-prompted instances
    when there are any. Images are numbered 1..N in (input path, id) order, so the same manifest always
    gives the same file. Every image of the job is listed, including those with no detection (their
    absence of annotations is information for a labelling set); failed rows are not.
    """
    if mode not in EXPORT_STATUSES:
        raise ValueError(f"COCO export is for modes {sorted(EXPORT_STATUSES)}, not {mode!r}")
    names = list(queries)
    if any("prompt" in (r.get("labels") or []) for r in rows) and "prompt" not in names:
        names.append("prompt")
    cat_id = {n: k + 1 for k, n in enumerate(names)}
    kept = sorted(
        (r for r in rows if r["status"] in (EXPORT_STATUSES[mode], "no_detection")),
        key=lambda r: (r["input_path"], r["id"]),
    )
    images, annotations = [], []
    for image_id, r in enumerate(kept, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": _file_name(r["input_path"], input_root),
                "width": int(r["width"]),
                "height": int(r["height"]),
                "promptpaint_id": r["id"],
            }
        )
        if r["status"] == "no_detection":
            continue
        boxes = r.get("boxes") or []
        rles = r.get("rles") or []
        scores = r.get("mask_scores") or []
        for k, (label, det_score) in enumerate(zip(r["labels"], r["det_scores"], strict=True)):
            if mode == "detect" and k >= len(boxes):
                continue  # a points-only sidecar instance has no box, and detect mode has no mask
            ann: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_id[label],
                "score": float(det_score),
                "iscrowd": 0,
            }
            if mode == "segment":
                rle = rles[k]
                area, bbox = rle_area_bbox(rle)
                ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"]}
                ann["area"] = area
                ann["mask_score"] = float(scores[k]) if k < len(scores) else None
                # A points-only instance has no prompting box: its box is the mask's.
                if k < len(boxes):
                    bbox = _xywh(boxes[k])
                ann["bbox"] = bbox
            else:
                ann["bbox"] = _xywh(boxes[k])
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            annotations.append(ann)
    return {
        "info": {"description": "promptpaint export", "mode": mode},
        "images": images,
        "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in cat_id.items()],
        "annotations": annotations,
    }


def _xywh(box: list[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def export(output: str, mode: str, queries: list[str], input_root: str, spec_hash: str) -> dict[str, Any]:
    """Write ``<output>/coco.json`` from the manifest rows of this spec; returns counts and the path.

    Rows of the manifest made by other specs (another output of the same folder) are left out, so the
    file describes exactly one job configuration, including the rows earlier runs of it recorded.
    """
    cols = ["id", "input_path", "status", "width", "height", "boxes", "labels", "det_scores", "spec_hash"]
    if mode == "segment":
        cols += ["rles", "mask_scores"]
    table = manifest.read_manifest(output, columns=cols)
    rows = [] if table is None else [r for r in table.to_pylist() if r["spec_hash"] == spec_hash]
    data = build(rows, mode, queries, input_root)
    uri = join(output, COCO_FILE)
    atomic_write(uri, json.dumps(data, separators=(",", ":")).encode())
    return {"path": uri, "images": len(data["images"]), "annotations": len(data["annotations"])}
