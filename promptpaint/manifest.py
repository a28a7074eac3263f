"""The Parquet manifest: one row per input, written in parts after the images they describe.

``<output>/manifest/part-<run>-<seq>.parquet`` files are written atomically by the driver as results
stream in, so a killed job keeps every part it finished and a re-run skips those ids. ``_SUCCESS``
(a JSON summary) is written last and removed when a new run starts.
"""

from __future__ import annotations

import io as _io
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from promptpaint.io import atomic_write, join

MANIFEST_DIR = "manifest"
SUCCESS = "_SUCCESS"
STATUSES = ("edited", "detected", "segmented", "no_detection", "error", "qc_failed", "skipped")
RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

# Typed columns; everything else (spec.*, model.*) is inferred per part and promoted on read.
CORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_path", pa.string()),
        ("status", pa.string()),
        ("error_stage", pa.string()),
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("output_path", pa.string()),
        ("mask_path", pa.string()),
        ("seed", pa.int64()),
        ("spec_hash", pa.string()),
        ("experiment_key", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32()))),
        ("labels", pa.list_(pa.string())),
        ("det_scores", pa.list_(pa.float32())),
        ("mask_scores", pa.list_(pa.float32())),
        ("mask_area", pa.int64()),
        ("instances", pa.int32()),
        ("crop", pa.list_(pa.int32())),
        ("crops", pa.list_(pa.list_(pa.int32()))),
        ("edit_prompts", pa.list_(pa.string())),
        ("rles", pa.list_(RLE)),
        ("clip_scores", pa.list_(pa.float32())),
        ("clip_score", pa.float32()),
    ]
)


def _fs(output: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(output)
    return fs, path


def part_paths(output: str) -> list[str]:
    fs, root = _fs(output)
    folder = f"{root.rstrip('/')}/{MANIFEST_DIR}"
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))


def read_manifest(output: str, columns: list[str] | None = None) -> pa.Table | None:
    """All manifest parts as one table (None when there are none)."""
    fs, _ = _fs(output)
    tables = []
    for p in part_paths(output):
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def done_ids(output: str) -> set[str]:
    """Ids already in the manifest: a re-run of the same spec skips them."""
    table = read_manifest(output, columns=["id"])
    return set() if table is None else set(table.column("id").to_pylist())


def combine(uris: list[str]) -> bytes | None:
    """Several manifest parts as one Parquet file's bytes (None when there are none)."""
    if not uris:
        return None
    tables = []
    for uri in uris:
        with fsspec.open(uri, "rb") as f:
            tables.append(pq.read_table(f))
    sink = _io.BytesIO()
    pq.write_table(pa.concat_tables(tables, promote_options="permissive"), sink, compression="zstd")
    return sink.getvalue()


def done_keys(output: str) -> set[tuple[str, str]]:
    """(id, input path) pairs already in the manifest. Skip by these, not by id alone: two inputs with
    identical bytes share an id, and a run that recorded one of them must not skip the other forever."""
    table = read_manifest(output, columns=["id", "input_path"])
    if table is None:
        return set()
    return set(zip(table.column("id").to_pylist(), table.column("input_path").to_pylist(), strict=True))


def done_paths(output: str, spec_hash: str) -> set[str]:
    """Input paths this spec already processed (for ``--incremental``: skip them unread)."""
    table = read_manifest(output, columns=["input_path", "spec_hash"])
    if table is None:
        return set()
    rows = zip(table.column("input_path").to_pylist(), table.column("spec_hash").to_pylist(), strict=True)
    return {p for p, h in rows if h == spec_hash}


def clear_success(output: str) -> None:
    fs, root = _fs(output)
    marker = f"{root.rstrip('/')}/{SUCCESS}"
    if fs.exists(marker):
        fs.rm(marker)


def write_success(output: str, summary: dict[str, Any]) -> None:
    atomic_write(join(output, SUCCESS), json.dumps(summary, indent=2, sort_keys=True).encode())


def success_exists(output: str) -> bool:
    fs, root = _fs(output)
    return bool(fs.exists(f"{root.rstrip('/')}/{SUCCESS}"))


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> table with the core columns typed and the rest inferred."""
    extra = [k for k in rows[0] if k not in CORE_SCHEMA.names]
    arrays = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in CORE_SCHEMA]
    fields = list(CORE_SCHEMA)
    for k in extra:
        arr = pa.array([r.get(k) for r in rows])
        arrays.append(arr)
        fields.append(pa.field(k, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


class ManifestWriter:
    """Buffer rows and write a part every ``every`` rows (and on ``close``)."""

    def __init__(self, output: str, every: int = 256):
        self.output = output
        self.every = every
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.buffer: list[dict[str, Any]] = []
        self.parts = 0
        self.rows = 0
        self.written: list[str] = []

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        sink = _io.BytesIO()
        pq.write_table(to_table(self.buffer), sink, compression="zstd")
        name = f"part-{self.run}-{self.parts:05d}.parquet"
        uri = join(self.output, MANIFEST_DIR, name)
        atomic_write(uri, sink.getvalue())
        self.written.append(uri)
        self.parts += 1
        self.rows += len(self.buffer)
        self.buffer = []

    def close(self) -> None:
        self.flush()
