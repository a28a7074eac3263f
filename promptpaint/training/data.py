"""Training examples: decode + resize + crop (a Ray Data map over the instance and class images), random masks,
and the per-step batch each worker draws from its shard.

Sharding is by example index (``index % world_size == rank``), not by Ray Data's streaming split: the split
decides which worker sees which image, and a resumed or restarted run must draw the same images at the same
step, so every worker reads the (small: 3-20 instance, ~100-200 class images) dataset and keeps its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from promptpaint.io import decode_image, read_bytes

# Decoding limits for training photos (phone photos are 12-50 MP).
MAX_PIXELS = 200_000_000
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")


@dataclass(frozen=True)
class Example:
    index: int
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray | None  # (S, S) uint8 (255 = repaint), the subject's own mask (masks: auto)
    time_ids: tuple[int, int, int, int, int, int]  # SDXL: original (h, w), crop (top, left), target (h, w)


def square(
    image: np.ndarray, side: int, center: bool, rng: np.random.Generator, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int, int, int]]:
    """Resize the shorter side to ``side`` and crop a square (centre or random); the mask follows the image."""
    h, w = image.shape[:2]
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.LANCZOS))
    top = (nh - side) // 2 if center else int(rng.integers(0, nh - side + 1))
    left = (nw - side) // 2 if center else int(rng.integers(0, nw - side + 1))
    img = np.ascontiguousarray(img[top : top + side, left : left + side])
    out_mask = None
    if mask is not None:
        m = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        out_mask = np.ascontiguousarray(m[top : top + side, left : left + side])
    return img, out_mask, (h, w, top, left, side, side)


def preprocess(batch: dict[str, Any], side: int, center_crop: bool, seed: int) -> dict[str, Any]:
    """Ray Data batch function: rows of (index, path[, mask_path]) -> decoded square examples.

    Columns out: index, image (S, S, 3) uint8, mask (S, S) uint8 or (0, 0) when there is none, time_ids (6,).
    The crop of a random crop is seeded by (seed, index): the same example every epoch and every run.
    """
    images, masks, time_ids = [], [], []
    for k, index in enumerate(batch["index"]):
        path = str(batch["path"][k])
        decoded = decode_image(read_bytes(path), max_pixels=MAX_PIXELS, formats=FORMATS)
        mask_path = str(batch["mask_path"][k]) if "mask_path" in batch else ""
        mask = None
        if mask_path:
            label = np.asarray(Image.open(_buffer(read_bytes(mask_path))))
            mask = ((label > 0) * 255).astype(np.uint8)
        rng = np.random.default_rng([seed, int(index)])
        img, m, ids = square(decoded.rgb, side, center_crop, rng, mask)
        images.append(img)
        masks.append(m if m is not None else np.zeros((0, 0), np.uint8))
        time_ids.append(np.asarray(ids, np.int64))
    return {"index": batch["index"], "image": images, "mask": masks, "time_ids": time_ids}


def _buffer(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def local_examples(rows: list[dict[str, Any]], rank: int, world: int) -> list[Example]:
    """This worker's examples (``index % world == rank``), ordered by index; with fewer examples than workers,
    worker r takes example ``r % n`` so every worker has one."""
    examples = sorted(
        (
            Example(
                int(r["index"]),
                np.asarray(r["image"]),
                np.asarray(r["mask"]) if np.asarray(r["mask"]).size else None,
                tuple(int(x) for x in r["time_ids"]),  # type: ignore[arg-type]
            )
            for r in rows
        ),
        key=lambda e: e.index,
    )
    if not examples:
        return []
    mine = [e for e in examples if e.index % world == rank]
    return mine or [examples[rank % len(examples)]]


def draw(examples: list[Example], seed: int, rank: int, position: int, count: int, stream: int) -> list[Example]:
    """Examples ``position .. position + count`` of this worker's endless stream: each pass over its shard is a
    permutation seeded by (seed, rank, stream, pass), so the draw at a position never depends on the past."""
    n = len(examples)
    out = []
    for p in range(position, position + count):
        perm = np.random.default_rng([seed, rank, stream, p // n]).permutation(n)
        out.append(examples[int(perm[p % n])])
    return out


def random_mask(side: int, rng: np.random.Generator) -> np.ndarray:
    """A random repaint mask (S, S) uint8: one to three rectangles or ellipses covering roughly 10-60 %."""
    mask = np.zeros((side, side), bool)
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(int(rng.integers(1, 4))):
        h, w = (rng.uniform(0.25, 0.75, 2) * side).astype(int).clip(1, side)
        y0, x0 = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
        if rng.random() < 0.5:
            mask[y0 : y0 + h, x0 : x0 + w] = True
        else:
            cy, cx, ry, rx = y0 + h / 2, x0 + w / 2, max(h / 2, 1), max(w / 2, 1)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask.astype(np.uint8) * 255
