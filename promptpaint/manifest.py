"""The Parquet manifest: one row per input, written in parts after the images they describe.

``<output>/manifest/part-<run>-<seq>.parquet`` files are written atomically by the process that wrote the
task block's images (a Ray worker, or the local loop), one part per task block, so a killed job keeps
every part it finished and a re-run skips those ids; the driver only learns the part names. ``_SUCCESS``
(a JSON summary) is written last and removed when a new run starts.
"""

from __future__ import annotations

import io as _io
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from promptpaint.io import atomic_write, join

MANIFEST_DIR = "manifest"
SUCCESS = "_SUCCESS"
STATUSES = ("edited", "detected", "segmented", "no_detection", "error", "qc_failed", "skipped")
# Errors that another run would repeat (the input itself is bad). Every other error kind -- model_error (an
# out-of-memory, a node lost), io_error (storage hiccup), internal_error (a bug, fixed since) -- is transient:
# the next run over the same output retries the input, and its new row replaces the old one.
FINAL_ERROR_KINDS = frozenset({"undecodable", "truncated", "empty", "too_large", "unsupported_format", "bad_prompt"})


def is_final(status: str, error_kind: str | None) -> bool:
    """True when a re-run must skip this row: it succeeded, found nothing, or its input is bad."""
    return status != "error" or (error_kind or "") in FINAL_ERROR_KINDS


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


def read_manifest(output: str, columns: list[str] | None = None, latest: bool = True) -> pa.Table | None:
    """All manifest parts as one table (None when there are none).

    ``latest``: one row per (id, input path), the one from the newest part. An input retried after a
    transient error has an older row until the run that retried it finishes (``supersede`` drops it).
    """
    fs, _ = _fs(output)
    tables = []
    want = None if columns is None else list(dict.fromkeys([*columns, "id", "input_path"] if latest else columns))
    for p in part_paths(output):
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=want))
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    if latest:
        keys = list(zip(table.column("id").to_pylist(), table.column("input_path").to_pylist(), strict=True))
        last = {k: n for n, k in enumerate(keys)}
        if len(last) < len(keys):
            table = table.take(sorted(last.values()))
    return table if columns is None else table.select(columns)


def combine_file(uris: list[str], path: str) -> int:
    """Several manifest parts as one local Parquet file at ``path``, one part in memory at a time; returns
    its rows (0 and no file when there are no parts). Columns a part lacks are nulls; types are promoted."""
    if not uris:
        return 0
    schemas = []
    for uri in uris:
        with fsspec.open(uri, "rb") as f:
            schemas.append(pq.read_schema(f))
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as out:
        for uri in uris:
            with fsspec.open(uri, "rb") as f:
                table = pq.read_table(f)
            cols = [
                table.column(field.name).cast(field.type) if field.name in table.column_names
                else pa.nulls(len(table), field.type)
                for field in schema
            ]  # fmt: skip
            out.write_table(pa.Table.from_arrays(cols, schema=schema))
            rows += len(table)
    return rows


def read_keys(uris: Iterable[str]) -> set[tuple[str, str]]:
    """The (id, input path) pairs in these parts (a run's own parts, read back after it)."""
    keys: set[tuple[str, str]] = set()
    for uri in uris:
        with fsspec.open(uri, "rb") as f:
            t = pq.read_table(f, columns=["id", "input_path"])
        keys.update(zip(t.column("id").to_pylist(), t.column("input_path").to_pylist(), strict=True))
    return keys


@dataclass
class ManifestState:
    """What earlier runs recorded: the (id, input path) pairs a re-run skips, and those it retries."""

    final: set[tuple[str, str]] = field(default_factory=set)
    transient: set[tuple[str, str]] = field(default_factory=set)
    final_paths: dict[str, set[str]] = field(default_factory=dict)  # spec hash -> input paths with a final row


def load_state(output: str) -> ManifestState:
    table = read_manifest(output, columns=["id", "input_path", "status", "error_kind", "spec_hash"])
    state = ManifestState()
    if table is None:
        return state
    cols = [table.column(c).to_pylist() for c in ("id", "input_path", "status", "error_kind", "spec_hash")]
    for row_id, path, status, kind, spec_hash in zip(*cols, strict=True):
        if is_final(status, kind):
            state.final.add((row_id, path))
            state.final_paths.setdefault(spec_hash, set()).add(path)
        else:
            state.transient.add((row_id, path))
    return state


def supersede(output: str, keys: set[tuple[str, str]], keep: Iterable[str]) -> int:
    """Drop rows with these (id, input path) keys from every part except ``keep`` (this run's parts).

    Called after a run that retried earlier transient rows, so an input has one row however often the job
    runs. Each part is rewritten atomically; returns the number of rows dropped.
    """
    if not keys:
        return 0
    fs, _ = _fs(output)
    keep_names = {k.rstrip("/").rsplit("/", 1)[-1] for k in keep}
    dropped = 0
    for p in part_paths(output):
        name = p.rsplit("/", 1)[-1]
        if name in keep_names:
            continue
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
        ids, paths = table.column("id").to_pylist(), table.column("input_path").to_pylist()
        mask = [(i, q) not in keys for i, q in zip(ids, paths, strict=True)]
        if all(mask):
            continue
        dropped += mask.count(False)
        uri = join(output, MANIFEST_DIR, name)
        if any(mask):
            sink = _io.BytesIO()
            pq.write_table(table.filter(pa.array(mask)), sink, compression="zstd")
            atomic_write(uri, sink.getvalue())
        else:
            fs.rm(p)
    return dropped


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


def new_run() -> str:
    """A run's part prefix, sortable by start time (microseconds): part order is run order, so the newest
    row of an input wins (``read_manifest(latest=True)``)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now % 1 * 1e6):06d}-{uuid.uuid4().hex[:6]}"


def part_name(run: str, seq: int) -> str:
    """The part holding the task block that starts at row ``seq`` of the listing. Deterministic: a retried
    block rewrites its own part, never adds a second one."""
    return f"part-{run}-{seq:012d}.parquet"


def write_part(output: str, name: str, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` as the part ``name`` (atomically, where the rows were made); returns its URI."""
    sink = _io.BytesIO()
    pq.write_table(to_table(rows), sink, compression="zstd")
    uri = join(output, MANIFEST_DIR, name)
    atomic_write(uri, sink.getvalue())
    return uri
