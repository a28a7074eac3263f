"""One driver, any corpus size (issue 13): the listing streams, task blocks grow but keep model calls fixed,
manifest parts are written where the rows are made, and the driver keeps counts and part names only.

The throughput and memory figures are a benchmark (benchmarks/driver_scale.py), not a timed test.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from promptpaint import io as pio
from promptpaint import manifest
from promptpaint.config import EditSpec, build_spec
from promptpaint.jobs.bulk_edit import CARRIED, Listing, Recorder, StageContext, run_job, task_blocks_of
from promptpaint.jobs.plan import WARM_BLOCKS, ClusterShape, NodeShape, plan, task_blocks
from promptpaint.samples import make_samples

# Names chosen so that a per-directory walk in listing order would go wrong: "a.jpg" < "a/x.jpg" < "a0.jpg"
# in the global sort, "a-b.jpg" before all three, and two files sharing a stem ("s/k.jpg", "s/k.png").
TREE = ["a.jpg", "a/x.jpg", "a/y/z.png", "a0.jpg", "a-b.jpg", "b.png", "s/k.jpg", "s/k.png", "s/l.webp",
        "s/.hidden.png", ".git/h.png", "notes.txt", "zz/deep/er/q.jpg"]  # fmt: skip


def spec(**sections: Any) -> EditSpec:
    return build_spec(EditSpec, {"input": "in", "output": "out", **sections})


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_streamed_listing_is_the_sorted_listing_with_the_same_names(tmp_path, where):
    root = str(tmp_path) if where == "local" else f"memory://pp-list-{uuid.uuid4().hex}"
    for name in TREE:
        pio.atomic_write(pio.join(root, name), b"x")
    fs, base = fsspec.core.url_to_fs(root)
    found = [p for p in fs.find(base) if not any(part.startswith(".") for part in p[len(base) :].split("/"))]
    expected = sorted(
        (p if where == "local" else f"memory://{p.lstrip('/')}") for p in found if not p.endswith(".txt")
    )  # what expand_input listed before it streamed: fs.find, filtered, sorted
    streamed = list(pio.iter_inputs(root))
    assert [p for p, _ in streamed] == expected
    assert dict(streamed) == pio.output_names(expected, pio.input_root(root))  # names as if listed at once
    assert dict(streamed)[pio.join(root, "s/k.jpg")] == "s/k.jpg"  # a shared stem keeps its extension
    assert dict(streamed)[pio.join(root, "a/y/z.png")] == "a/y/z"


def test_task_blocks_are_whole_blocks_growing_to_the_part_size():
    p = plan(spec(runtime={"batch_size": {"detect": 4, "segment": 4, "inpaint": 4}, "manifest_every": 100}),
             ClusterShape((NodeShape(2, 0),)))  # fmt: skip
    assert (p.block_rows, p.part_rows) == (4, 100)
    sizes = task_blocks(p)
    first = [next(sizes) for _ in range(WARM_BLOCKS + 6)]
    assert first == [4] * WARM_BLOCKS + [8, 16, 32, 64, 100, 100]
    assert all(s % p.block_rows == 0 for s in first)


def test_listing_cuts_task_blocks_and_leaves_out_done_paths(tmp_path):
    for i in range(50):
        (tmp_path / f"{i:03d}.png").write_bytes(b"x")
    p = plan(spec(runtime={"batch_size": {"detect": 2, "segment": 2, "inpaint": 2}}), ClusterShape((NodeShape(2, 0),)))
    done = frozenset(str(tmp_path / f"{i:03d}.png") for i in range(0, 50, 5))  # 10 finished earlier
    blocks = list(Listing(str(tmp_path), p, done).blocks())
    sizes = [len(b["path"]) for b in blocks]
    assert sizes == [2] * WARM_BLOCKS + [4, 8, 12]  # 40 pending rows; the last block is what is left
    paths = [os.fsdecode(x) for b in blocks for x in b["path"]]
    assert paths == sorted(str(q) for q in tmp_path.iterdir() if str(q) not in done)
    assert [b["block"][0] for b in blocks] == [sum(sizes[:k]) for k in range(len(sizes))]
    assert blocks[-1]["listed"] == [50] * 12  # the last block knows the whole listing, done paths included
    assert [b["last"][0] for b in blocks] == [0] * (len(blocks) - 1) + [1]
    assert all(len(set(b["block"])) == 1 for b in blocks)


def test_a_batch_holding_several_task_blocks_is_cut_back_into_them():
    """Ray may hand a group two task blocks at once, in any order: each must still run on its own (a short last
    block first would otherwise shift every later block's rows into other model calls)."""
    rows = {"id": list("abcdefg"), "block": [8, 8, 0, 0, 0, 0, 4], "listed": [10] * 7}
    parts = task_blocks_of(rows)
    assert [p["id"] for p in parts] == [["a", "b"], ["c", "d", "e", "f"], ["g"]]
    descriptors = {"block": [0, 3], "listed": [3, 5], "last": [0, 1], "paths": [[b"x", b"y", b"z"], [b"u", b"v"]],
                   "names": [[b"x", b"y", b"z"], [b"u", b"v"]]}  # fmt: skip
    a, b = task_blocks_of(descriptors)
    assert a == {"path": [b"x", b"y", b"z"], "name": [b"x", b"y", b"z"], "block": [0, 0, 0], "listed": [3, 3, 3],
                 "last": [0, 0, 0]}  # fmt: skip
    assert b["block"] == [3, 3] and b["listed"] == [5, 5]
    assert task_blocks_of({"id": ["a"]}) == [{"id": ["a"]}]  # no bookkeeping: one block (serve, tests)
    assert set(CARRIED) == {"block", "listed", "last"}


def slim_rows(n: int, status: str = "error", block: int = 40) -> dict[str, list[Any]]:
    from promptpaint.actors.writer import JSON_COLUMNS, MANIFEST_COLUMNS, TIMING_STAGES

    rows: dict[str, list[Any]] = {c: ["[]" if c in JSON_COLUMNS else ""] * n for c in MANIFEST_COLUMNS}
    for c in ("seed", "width", "height", "mask_area", "instances"):
        if c in rows:
            rows[c] = [0] * n
    if "clip_score" in rows:
        rows["clip_score"] = [0.0] * n
    rows.update(id=[f"{i:064x}" for i in range(1, n + 1)], path=[f"/in/{i}.png" for i in range(n)],
                status=[status] * n, block=[block] * n, listed=[99] * n)  # fmt: skip
    if status == "error":
        rows.update(error_kind=["model_error"] * n, error_stage=["inpaint"] * n,
                    error_message=["CUDA out of memory\nmore"] * n)  # fmt: skip
    rows.update({f"t_{s}_ms": [1.5] * n for s in TIMING_STAGES})
    return rows


def test_the_recorder_writes_one_part_per_block_and_returns_only_a_summary(tmp_path):
    out = tmp_path / "out"
    ctx = StageContext(run=manifest.new_run(), run_cols={"spec_hash": "h", "model.inpaint.name": "sd"},
                       fingerprint=True, sample_k=2)  # fmt: skip
    rec = Recorder(spec(output=str(out)), ctx)
    first = rec(slim_rows(5))
    again = rec(slim_rows(5))  # a retried task: the same block again
    assert first == again and list(first) == ["summary"] and len(first["summary"]) == 1
    import json

    s = json.loads(first["summary"][0])
    assert (s["block"], s["rows"], s["listed"], s["last"]) == (40, 5, 99, False)
    assert s["counts"] == {"error": 5} and s["errors"] == {"model_error": 5}
    assert s["broken"] == [["model_error", "inpaint", 5, "CUDA out of memory"]]
    assert s["stage_ms"]["read"] == 7.5 and s["ids"] == 5 and int(s["fingerprint"], 16) == sum(range(1, 6))
    assert s["samples"] == []  # errors are never sampled
    edited = json.loads(rec(slim_rows(4, status="edited", block=0))["summary"][0])
    assert [r["id"] for r in edited["samples"]] == [f"{1:064x}", f"{2:064x}"]  # the block's k smallest ids
    assert edited["samples"][0]["input_path"] == "/in/0.png" and edited["samples"][0]["spec_hash"] == "h"
    parts = manifest.part_paths(str(out))
    assert [Path(p).name for p in parts] == [manifest.part_name(ctx.run, b) for b in (0, 40)]  # 40 rewritten
    table = pq.read_table(parts[1])
    assert table.num_rows == 5 and set(table.column("spec_hash").to_pylist()) == {"h"}
    assert "block" not in table.column_names and "listed" not in table.column_names
    skipped = json.loads(rec(slim_rows(3, status="skipped"))["summary"][0])
    assert skipped["part"] == "" and skipped["counts"] == {"skipped": 3}  # nothing new to record


@pytest.mark.heavy
def test_the_driver_gets_block_summaries_and_parts_hold_every_row_once(tmp_path, tiny_models, ray_session):
    """30 inputs (3 of them broken) through Ray: the driver's hook sees summaries, never rows; every input is in
    exactly one part; a re-run with --incremental and 6 new inputs writes parts for those 6 only."""
    inputs = tmp_path / "in"
    make_samples(inputs / "a", 15, size=(48, 40), seed=1)
    make_samples(inputs / "b", 12, size=(40, 48), seed=2)
    for name in ("broken.png", "empty.jpg", "c/text.png"):
        (inputs / name).parent.mkdir(exist_ok=True)
        (inputs / name).write_bytes(b"not an image" if "empty" not in name else b"")
    out = tmp_path / "out"
    data = {"input": str(inputs), "output": str(out), "models_dir": str(tiny_models),
            "detect": {"queries": ["a car"]}, "inpaint": {"prompt": "x", "steps": 2}, "lineage": {"mode": "off"},
            "runtime": {"executor": "ray", "batch_size": {"detect": 2, "segment": 2, "inpaint": 2}}}  # fmt: skip
    seen: list[dict[str, Any]] = []
    result = run_job(build_spec(EditSpec, data), progress=False, on_batch=seen.append)
    assert all("id" not in b and "path" not in b for b in seen)
    assert sum(b["rows"] for b in seen) == 30 == result.inputs
    assert [b["listed"] for b in seen if b["last"]] == [30]  # exactly one block ends the listing
    assert sorted(b["block"] for b in seen) == [2 * k for k in range(WARM_BLOCKS)] + [16, 20, 28]
    parts = manifest.part_paths(str(out))
    assert len(parts) == len(seen) == result.summary["manifest_parts_written"]
    rows = [r for p in parts for r in pq.read_table(p, columns=["input_path"]).column("input_path").to_pylist()]
    assert sorted(rows) == sorted(set(rows)) == pio.expand_input(str(inputs))
    assert result.errors == {"undecodable": 2, "empty": 1}

    make_samples(inputs / "new", 6, size=(48, 48), seed=3)
    seen.clear()
    again = run_job(build_spec(EditSpec, data), progress=False, incremental=True, on_batch=seen.append)
    assert again.inputs == 36 and again.counts["skipped"] == 30 and again.summary["processed"] == 6
    new_parts = sorted(set(manifest.part_paths(str(out))) - set(parts))
    assert len(new_parts) == len(seen) and sum(pq.read_table(p).num_rows for p in new_parts) == 6
    assert len(manifest.read_manifest(str(out))) == 36


def test_the_manifest_asset_is_combined_part_by_part(tmp_path):
    import pyarrow as pa

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["1"], "x": pa.array([None], pa.null())}), a)
    pq.write_table(pa.table({"id": ["2"], "x": ["text"], "y": [3]}), b)
    assert manifest.combine_file([str(a), str(b)], str(tmp_path / "all.parquet")) == 2
    t = pq.read_table(tmp_path / "all.parquet")
    assert t.column("id").to_pylist() == ["1", "2"] and t.column("x").to_pylist() == [None, "text"]
    assert t.column("y").to_pylist() == [None, 3]
    assert manifest.combine_file([], str(tmp_path / "none.parquet")) == 0
    assert not Path(tmp_path / "none.parquet").exists()
