"""Per-image SAM prompts from a sidecar file: positive/negative points and boxes.

The sidecar (``segment.points_file``) is JSONL (one JSON object a line) or Parquet (one row a record).
Each record names one image and carries any of three optional prompt fields::

    {"path": "sample_0000.jpg", "points": [[40, 30], [60, 30]], "labels": [1, 0], "boxes": [[10, 5, 90, 60]]}

- key: ``path`` -- the input path as listed by the job (``promptpaint run --dry-run`` shows them) or just
  its file name (then it applies to every input of that name) -- and/or ``id``, the row's content id
  (``sha256(bytes, spec hash)``, as in the manifest). A row takes the record of its id, else of its full
  path, else of its file name.
- ``points``: ``[[x, y], ...]`` in pixels of the original image; ``labels``: one ``1`` (positive: part
  of the object) or ``0`` (negative: not part of it) per point; ``boxes``: ``[[x0, y0, x1, y1], ...]``
  in pixels, ``x1 > x0`` and ``y1 > y0``.

How prompts combine with the detector (``instance_prompts`` and ``merge_instances`` implement it):

1. Sidecar boxes become instances of their own (label ``"prompt"``, detection score 1.0), after the
   detector's boxes (which ``detect.top_k`` limits; sidecar boxes never count against it).
2. Points refine box instances: each instance's box is prompted together with every point, positive
   or negative, that lies inside it (edges included). A point inside two boxes refines both; when the
   image has boxes, a point inside none of them is not used.
3. An image with points and no box from either source gets ONE instance prompted by all its points
   (label ``"prompt"``, score 1.0, no box, so ``segment.clip_to_box`` does not apply to it).
4. An image with sidecar prompts is never ``no_detection`` because the detector found nothing.

Rows without a record behave exactly as without a sidecar. A malformed sidecar fails at load time with
the file, the line (JSONL) or row (Parquet) and the problem; a record that does not fit its image (a
point outside it, a box that misses it) fails that row alone with error kind ``bad_prompt``.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptpaint.actors.common import Batch, active, ensure_column, set_error, timed

PROMPT_LABEL = "prompt"  # detection label of sidecar-prompted instances
PROMPT_SCORE = 1.0  # their detection score: the user asked for them
RECORD_FIELDS = ("path", "id", "points", "labels", "boxes")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def empty_points() -> np.ndarray:
    return np.zeros((0, 2), np.float32)


def empty_labels() -> np.ndarray:
    return np.zeros((0,), np.int64)


@dataclass(frozen=True)
class PromptRecord:
    """One validated sidecar record: boxes (M, 4) float32, points (P, 2) float32, labels (P,) int64."""

    where: str  # "line 3" / "row 3", for messages
    boxes: np.ndarray
    points: np.ndarray
    labels: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.boxes) == 0 and len(self.points) == 0

    def fit(self, h: int, w: int) -> tuple[np.ndarray, str]:
        """Boxes clipped to an (h, w) image, or an empty array and why the record does not fit it."""
        if len(self.points):
            x, y = self.points[:, 0], self.points[:, 1]
            bad = np.flatnonzero((x < 0) | (x > w) | (y < 0) | (y > h))
            if len(bad):
                return empty_boxes(), f"point {self.points[bad[0]].tolist()} lies outside the {w}x{h} image"
        b = self.boxes.copy()
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        bad = np.flatnonzero((b[:, 2] - b[:, 0] < 1) | (b[:, 3] - b[:, 1] < 1))
        if len(bad):
            return empty_boxes(), f"box {self.boxes[bad[0]].tolist()} covers less than 1 px of the {w}x{h} image"
        return b, ""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _coords(value: Any, field: str, width: int) -> np.ndarray:
    """A list of ``width``-number lists -> (K, width) float32, or ValueError naming the bad element."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field!r} must be a list of {width}-number lists, got {type(value).__name__}")
    out = np.zeros((len(value), width), np.float32)
    for k, item in enumerate(value):
        if (
            not isinstance(item, (list, tuple))
            or len(item) != width
            or not all(_is_number(v) and math.isfinite(v) for v in item)
        ):
            raise ValueError(f"{field}[{k}] must be {width} finite numbers, got {item!r}")
        out[k] = item
    return out


def parse_record(rec: Any, where: str) -> tuple[PromptRecord, str | None, str | None]:
    """Validate one raw record -> (PromptRecord, path key, id key). Raises ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be an object with 'path' or 'id', got {type(rec).__name__}")
    rec = {k: v for k, v in rec.items() if v is not None}  # Parquet nulls = field not given
    unknown = sorted(set(rec) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; a record has {list(RECORD_FIELDS)}")
    keys: dict[str, str | None] = {}
    for key in ("path", "id"):
        v = rec.get(key)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"{key!r} must be a non-empty string, got {v!r}")
        keys[key] = v.strip() if isinstance(v, str) else None
    if keys["path"] is None and keys["id"] is None:
        raise ValueError("the record has neither 'path' nor 'id', so it names no image")
    points = _coords(rec.get("points", []), "points", 2)
    raw_labels = rec.get("labels", [])
    if not isinstance(raw_labels, (list, tuple)):
        raise ValueError(f"'labels' must be a list of 0/1, got {type(raw_labels).__name__}")
    if len(raw_labels) != len(points):
        raise ValueError(
            f"'points' has {len(points)} entries but 'labels' has {len(raw_labels)}; give one label (1 or 0) per point"
        )
    for k, lab in enumerate(raw_labels):
        if not _is_number(lab) or lab not in (0, 1):
            raise ValueError(f"labels[{k}] must be 1 (positive) or 0 (negative), got {lab!r}")
    labels = np.asarray([int(lab) for lab in raw_labels], np.int64).reshape(-1)
    boxes = _coords(rec.get("boxes", []), "boxes", 4)
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        raise ValueError(f"boxes[{bad[0]}] = {boxes[bad[0]].tolist()} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    return PromptRecord(where, boxes, points, labels), keys["path"], keys["id"]


def _raw_records(path: str, data: bytes) -> list[tuple[str, Any]]:
    """(where, raw record) pairs from JSONL or Parquet bytes."""
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as e:  # noqa: BLE001 - any Arrow failure means "not a readable Parquet file"
            raise ValueError(f"segment.points_file {path!r} is not a readable Parquet file: {e}") from None
        return [(f"row {k + 1}", r) for k, r in enumerate(rows)]
    if not name.endswith(JSONL_SUFFIXES):
        raise ValueError(
            f"segment.points_file {path!r}: unknown format; name it *.jsonl (one JSON object a line) or *.parquet"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"segment.points_file {path!r} is not UTF-8 text: {e}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"segment.points_file {path!r} line {lineno}: not valid JSON ({e.msg})") from None
    return out


def _norm_path(p: str) -> str:
    return p if "://" in p else os.path.normpath(p)


def _is_bare_name(p: str) -> bool:
    return "/" not in p and os.sep not in p


class PromptTable:
    """A loaded, validated sidecar, indexed by id, full path and bare file name."""

    def __init__(self, path: str, records: list[tuple[str, Any]]):
        self.path = path
        self.by_id: dict[str, PromptRecord] = {}
        self.by_path: dict[str, PromptRecord] = {}
        self.by_name: dict[str, PromptRecord] = {}
        for where, raw in records:
            try:
                rec, key_path, key_id = parse_record(raw, where)
            except ValueError as e:
                raise ValueError(f"segment.points_file {path!r} {where}: {e}") from None
            if key_id is not None:
                self._add(self.by_id, key_id, rec, "id")
            if key_path is not None:
                if _is_bare_name(key_path):
                    self._add(self.by_name, key_path, rec, "path")
                else:
                    self._add(self.by_path, _norm_path(key_path), rec, "path")

    def _add(self, index: dict[str, PromptRecord], key: str, rec: PromptRecord, field: str) -> None:
        if key in index:
            raise ValueError(
                f"segment.points_file {self.path!r} {rec.where}: {field} {key!r} is already used by "
                f"{index[key].where}; give each image one record"
            )
        index[key] = rec

    def __len__(self) -> int:
        return len({id(r) for d in (self.by_id, self.by_path, self.by_name) for r in d.values()})

    def lookup(self, row_id: str, row_path: str) -> PromptRecord | None:
        """The record for a row: by id, else by full path, else by file name; None if there is none."""
        rec = self.by_id.get(row_id) or self.by_path.get(_norm_path(row_path))
        if rec is None:
            rec = self.by_name.get(posixpath.basename(row_path.replace(os.sep, "/")))
        return rec


def load_prompt_table(path: str) -> PromptTable:
    """Read and validate a sidecar (local path or fsspec URI). Missing file -> FileNotFoundError."""
    from promptpaint.io import read_bytes

    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"segment.points_file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"segment.points_file {path!r} is a folder; give a .jsonl or .parquet file") from None
    return PromptTable(path, _raw_records(path, data))


class PromptLoader:
    """Sidecar prompts onto rows (stage ``prompts``, between ``read`` and ``detect``).

    Loads and validates ``points_file`` once in ``__init__`` (see the module doc for the format).
    Batch in:  id, path, image list[(H, W, 3) uint8]
    Batch out: + prompt_boxes list[(M, 4) float32 xyxy px, clipped to the image],
               prompt_points list[(P, 2) float32 xy px], prompt_labels list[(P,) int64 in {0, 1}];
               empty arrays for rows without a record. A record that does not fit its image fails the
               row with error kind ``bad_prompt``.
    """

    stage = "prompts"

    def __init__(self, points_file: str):
        self.points_file = points_file
        self.table = load_prompt_table(points_file)

    def __call__(self, batch: Batch) -> Batch:
        boxes = ensure_column(batch, "prompt_boxes", empty_boxes)
        points = ensure_column(batch, "prompt_points", empty_points)
        labels = ensure_column(batch, "prompt_labels", empty_labels)
        rows = active(batch)
        with timed(batch, self.stage, rows):
            for i in rows:
                rec = self.table.lookup(batch["id"][i], batch["path"][i])
                if rec is None or rec.empty:
                    continue
                h, w = batch["image"][i].shape[:2]
                clipped, problem = rec.fit(h, w)
                if problem:
                    msg = f"segment.points_file {self.points_file!r} {rec.where}: {problem}"
                    set_error(batch, i, self.stage, "bad_prompt", msg)
                    continue
                boxes[i], points[i], labels[i] = clipped, rec.points.copy(), rec.labels.copy()
        return batch


# ---------------------------------------------------------------------------------------- combination


@dataclass(frozen=True)
class InstancePrompt:
    """What SAM is asked for one instance: a box (4,) or None, and points (P, 2) with labels (P,)."""

    box: np.ndarray | None
    points: np.ndarray
    labels: np.ndarray

    @property
    def kind(self) -> tuple[bool, int]:
        """(has a box, number of points): instances of one kind share a SAM call without padding."""
        return self.box is not None, len(self.points)


def has_prompts(batch: Batch, i: int) -> bool:
    """True when row ``i`` carries sidecar boxes or points."""
    return any(len(batch[c][i]) for c in ("prompt_boxes", "prompt_points") if c in batch)


def merge_instances(
    boxes: np.ndarray,
    labels: list[str],
    scores: np.ndarray,
    prompt_boxes: np.ndarray | None,
    prompt_points: np.ndarray | None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Detector output + sidecar prompts -> the row's instances (rules 1 and 3 of the module doc).

    Returns boxes (B, 4) float32 -- the detector's, then the sidecar's -- and labels / scores with one
    entry per instance: B, or 1 for a points-only image (which has no box).
    """
    pb = empty_boxes() if prompt_boxes is None else np.asarray(prompt_boxes, np.float32).reshape(-1, 4)
    n_points = 0 if prompt_points is None else len(prompt_points)
    out_boxes = np.concatenate([np.asarray(boxes, np.float32).reshape(-1, 4), pb])
    out_labels = list(labels) + [PROMPT_LABEL] * len(pb)
    out_scores = np.concatenate(
        [np.asarray(scores, np.float32).reshape(-1), np.full(len(pb), PROMPT_SCORE, np.float32)]
    )
    if len(out_boxes) == 0 and n_points:
        out_labels = [PROMPT_LABEL]
        out_scores = np.array([PROMPT_SCORE], np.float32)
    return out_boxes, out_labels, out_scores


def instance_prompts(boxes: np.ndarray, points: np.ndarray | None, labels: np.ndarray | None) -> list[InstancePrompt]:
    """A row's instance boxes (detector + sidecar) and sidecar points -> one prompt per instance.

    Each box gets the points inside it (edges included), positive and negative; with no box, all the
    points form one instance; with neither, there is no instance.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    p = empty_points() if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    lab = empty_labels() if labels is None else np.asarray(labels, np.int64).reshape(-1)
    if len(b) == 0:
        return [InstancePrompt(None, p, lab)] if len(p) else []
    out = []
    for box in b:
        inside = (p[:, 0] >= box[0]) & (p[:, 0] <= box[2]) & (p[:, 1] >= box[1]) & (p[:, 1] <= box[3])
        out.append(InstancePrompt(box, p[inside], lab[inside]))
    return out
