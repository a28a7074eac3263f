"""Paths -> decoded images with content ids (CPU)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection

import numpy as np

from promptpaint.actors.common import Batch, ensure_column, new_rows, set_error, timed
from promptpaint.actors.writer import utf8_safe
from promptpaint.config import LimitsSpec
from promptpaint.io import DecodeError, content_id, decode_image, read_bytes


def _text(v: object) -> str:
    """A path as the driver listed it: bytes (how non-UTF-8 names cross Arrow) back to str."""
    return os.fsdecode(v) if isinstance(v, bytes) else str(v)


class Reader:
    """Read and decode inputs, with limits.

    Batch in:  path list[str]; optional name list[str] (output names, passed through)
    Batch out: id, path, status, error_*, image (H, W, 3) uint8, alpha (H, W) uint8 or (0, 0) when the
               input has no transparency, width, height.
    An input whose id -- or (id, path) pair -- is in ``done_ids`` gets status ``skipped`` and is not
    decoded. Pass pairs (``manifest.load_state(output).final``): with bare ids, an input whose bytes equal an input
    already recorded under another path is skipped without ever getting a manifest row of its own.
    """

    stage = "read"

    def __init__(self, limits: LimitsSpec, spec_hash: str, done_ids: Collection[str | tuple[str, str]] = frozenset()):
        self.limits = limits
        self.spec_hash = spec_hash
        self.done_ids = done_ids

    def __call__(self, batch: dict[str, list]) -> Batch:
        paths = [_text(p) for p in batch["path"]]
        out = new_rows([""] * len(paths), paths)
        if "name" in batch:  # output names chosen by the driver (write.naming: input)
            out["name"] = [_text(x) for x in batch["name"]]
        images = ensure_column(out, "image", lambda: np.zeros((0, 0, 3), np.uint8))
        alphas = ensure_column(out, "alpha", lambda: np.zeros((0, 0), np.uint8))
        width = ensure_column(out, "width", lambda: 0)
        height = ensure_column(out, "height", lambda: 0)
        with timed(out, self.stage, range(len(paths))):
            for i, path in enumerate(paths):
                try:
                    data = read_bytes(path)
                except Exception as e:  # noqa: BLE001 - unreadable input is a row error, not a job error
                    # No bytes, so no content id: derive a stable one from the path instead.
                    out["id"][i] = hashlib.sha256(f"unreadable:{path}:{self.spec_hash}".encode()).hexdigest()
                    set_error(out, i, self.stage, "io_error", f"cannot read {path}: {type(e).__name__}: {e}")
                    continue
                out["id"][i] = content_id(data, self.spec_hash)
                if out["id"][i] in self.done_ids or (out["id"][i], utf8_safe(path)) in self.done_ids:
                    out["status"][i] = "skipped"
                    continue
                try:
                    dec = decode_image(
                        data,
                        max_pixels=self.limits.max_pixels,
                        formats=self.limits.formats,
                        max_bytes=self.limits.max_bytes,
                    )
                except DecodeError as e:
                    set_error(out, i, self.stage, e.kind, e.message)
                    continue
                images[i] = dec.rgb
                if dec.alpha is not None:
                    alphas[i] = dec.alpha
                height[i], width[i] = dec.rgb.shape[:2]
        return out
