"""The bulk job end to end: on a real local Ray (session fixture) and in the local executor."""

from __future__ import annotations

import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from promptpaint import manifest
from promptpaint.config import EditSpec, build_spec
from promptpaint.io import read_png_text
from promptpaint.jobs.bulk_edit import run_job
from promptpaint.jobs.plan import ClusterShape, plan
from promptpaint.samples import make_samples

STATUSES = set(manifest.STATUSES)


def make_spec(inputs: str, output: str, models: Path, **runtime: object) -> EditSpec:
    return build_spec(
        EditSpec,
        {
            "input": inputs,
            "output": output,
            "models_dir": str(models),
            "detect": {"queries": ["a car", "a dog"], "threshold": 0.55, "top_k": 4},
            "inpaint": {"steps": 2, "seed": 7},
            "runtime": {"batch_size": {"detect": 4, "segment": 4, "inpaint": 4}, **runtime},
        },
    )


def corpus(folder: Path, n_good: int = 20) -> list[Path]:
    """n_good images plus five broken ones: truncated, empty, text, bomb header, unsupported format."""
    paths = make_samples(folder, n_good, size=(96, 72), seed=3, broken=True)
    bomb = Image.new("L", (4, 4))
    bomb.save(folder / "bomb.png")
    data = bytearray((folder / "bomb.png").read_bytes())
    data[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR CRC over type + data
    (folder / "bomb.png").write_bytes(bytes(data))
    Image.new("RGB", (16, 16)).save(folder / "odd.png", format="ICO")  # an icon named .png
    return [*paths, folder / "bomb.png", folder / "odd.png"]


def assert_complete(output: str, inputs: list[str]) -> dict:
    """Every input exactly once in the manifest; an image and a mask for each edited row; _SUCCESS."""
    table = manifest.read_manifest(output)
    assert table is not None
    rows = table.to_pylist()
    assert sorted(r["input_path"] for r in rows) == sorted(inputs)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["status"] for r in rows} <= STATUSES
    fs, root = fsspec.core.url_to_fs(output)
    images = fs.ls(f"{root}/images", detail=False) if fs.exists(f"{root}/images") else []
    edited = [r for r in rows if r["status"] == "edited"]
    assert len(images) == len(edited)
    for r in edited:
        assert fs.exists(r["output_path"]) and fs.exists(r["mask_path"])
        # write.naming: input (the default): the input's name, relative to the input folder
        assert r["output_path"].endswith(f"/images/{Path(r['input_path']).stem}.png")
    assert not [p for p in fs.find(root) if ".tmp-" in p], "temporary files left behind"
    assert manifest.success_exists(output)
    return {r["input_path"]: r for r in rows}


@pytest.mark.heavy
def test_ray_job_broken_inputs_resume_and_determinism(tmp_path, tiny_models, ray_session):
    inputs = corpus(tmp_path / "in")
    out = str(tmp_path / "out")
    spec = make_spec(str(tmp_path / "in"), out, tiny_models, executor="ray")

    result = run_job(spec, progress=False)

    rows = assert_complete(out, [str(p) for p in inputs])
    kinds = {Path(p).name: r["error_kind"] for p, r in rows.items() if r["status"] == "error"}
    assert kinds == {
        "broken_truncated.jpg": "truncated",
        "broken_empty.png": "empty",
        "broken_text.jpg": "undecodable",
        "bomb.png": "too_large",
        "odd.png": "unsupported_format",
    }
    assert result.counts["edited"] >= 15, result.counts
    assert result.counts.get("error", 0) == 5
    edited = next(r for r in rows.values() if r["status"] == "edited")
    text = read_png_text(Path(edited["output_path"]).read_bytes())
    assert text["promptpaint:id"] == edited["id"]
    assert text["promptpaint:spec_hash"] == result.summary["spec_hash"] == edited["spec_hash"]
    # The run's hash covers the weights and dtype besides the spec (other weights, other ids).
    assert edited["spec_hash"] != spec.spec_hash()
    assert edited["model.inpaint.weights"].startswith("local:sha256:")
    assert int(text["promptpaint:seed"]) == edited["seed"]
    assert edited["model.inpaint.source"] == str(tiny_models / "sd15-inpaint")

    # A re-run of the same spec does no model work: every id is skipped, no manifest part is added.
    parts = manifest.part_paths(out)
    again = run_job(spec, progress=False)
    assert again.counts == {"skipped": len(inputs)}
    assert manifest.part_paths(out) == parts

    # The local executor (a plain loop) gives byte-identical images: the seed derives from the id.
    local_out = str(tmp_path / "local")
    run_job(spec.model_copy(update={"output": local_out}), progress=False)
    local_rows = assert_complete(local_out, [str(p) for p in inputs])
    for path, r in rows.items():
        assert local_rows[path]["status"] == r["status"]
        if r["status"] == "edited":
            a, b = Path(r["output_path"]), Path(local_rows[path]["output_path"])
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), f"{path}: pixels differ"
            ta, tb = read_png_text(a.read_bytes()), read_png_text(b.read_bytes())
            assert ta.pop("promptpaint:experiment_key") != tb.pop("promptpaint:experiment_key")  # one per run
            assert ta == tb


@pytest.mark.heavy
@pytest.mark.parametrize("fuse", ["none", "models"])
def test_ray_job_with_separate_pools(tmp_path, tiny_models, ray_session, fuse):
    """Pools per stage (or per device) with fractional CPUs on 2 cores must not deadlock, and rows with
    different numbers of detections must cross the hand-offs between pools."""
    make_samples(tmp_path / "in", 6, size=(64, 48), seed=5, broken=True)
    out = str(tmp_path / "out")
    spec = make_spec(str(tmp_path / "in"), out, tiny_models, executor="ray", fuse=fuse)
    spec.detect.threshold = 0.57
    result = run_job(spec, progress=False)
    rows = assert_complete(out, [str(p) for p in sorted((tmp_path / "in").iterdir())])
    assert sum(result.counts.values()) == 9 and result.counts["error"] == 3
    assert len({len(r["labels"]) for r in rows.values()}) > 1, "want ragged detection counts"


def test_local_job_resumes_after_partial_run(tmp_path, tiny_models):
    paths = make_samples(tmp_path / "in", 8, size=(64, 48), seed=1)
    out = str(tmp_path / "out")
    first = make_spec(str(tmp_path / "in" / "sample_000[0-3]*"), out, tiny_models, executor="local")
    run_job(first, progress=False)
    assert len(manifest.read_manifest(out)) == 4

    full = make_spec(str(tmp_path / "in"), out, tiny_models, executor="local")
    result = run_job(full, progress=False)
    assert result.counts["skipped"] == 4
    assert sum(v for k, v in result.counts.items() if k != "skipped") == 4
    assert_complete(out, [str(p) for p in paths])


def test_incremental_skips_known_paths_unread(tmp_path, tiny_models):
    paths = make_samples(tmp_path / "in", 3, size=(64, 48), seed=2)
    out = str(tmp_path / "out")
    spec = make_spec(str(tmp_path / "in"), out, tiny_models, executor="local")
    run_job(spec, progress=False)
    # Replace a processed file's bytes: a plain re-run hashes it and sees a new id; --incremental does not read it.
    Image.new("RGB", (64, 48), (1, 2, 3)).save(paths[1])
    inc = run_job(spec, progress=False, incremental=True)
    assert inc.counts == {"skipped": 3}
    plain = run_job(spec, progress=False)
    assert plain.counts["skipped"] == 2 and sum(plain.counts.values()) == 3


def test_memory_filesystem_end_to_end(tiny_models):
    """fsspec URIs in and out (memory:// stands in for s3:// or gs:// in the local executor)."""
    fs = fsspec.filesystem("memory")
    for i in range(3):
        img = Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8))
        with fs.open(f"memory://pp-in/img{i}.png", "wb") as f:
            img.save(f, format="PNG")
    fs.pipe("memory://pp-in/broken.jpg", b"not an image")
    spec = make_spec("memory://pp-in", "memory://pp-out", tiny_models, executor="local")
    result = run_job(spec, progress=False)
    rows = assert_complete(
        "memory://pp-out", [f"memory://pp-in/{n}" for n in ("broken.jpg", "img0.png", "img1.png", "img2.png")]
    )
    assert rows["memory://pp-in/broken.jpg"]["error_kind"] == "undecodable"
    assert result.counts.get("error") == 1
    fs.rm("memory://pp-in", recursive=True)
    fs.rm("memory://pp-out", recursive=True)


def test_plan_fuses_on_cpu_and_splits_on_gpu():
    spec = build_spec(EditSpec, {"input": "x", "output": "y"})
    (cpu,) = plan(spec, ClusterShape.single(2)).groups
    assert cpu.stages == ("read", "detect", "segment", "mask", "inpaint", "write")
    assert cpu.num_cpus == 2 and cpu.num_gpus == 0
    gpu = plan(spec, ClusterShape.single(16, 1)).groups
    assert [g.stages for g in gpu] == [("read",), ("detect", "segment", "mask", "inpaint"), ("write",)]
    assert gpu[1].num_gpus == 1 and gpu[0].num_gpus == 0 and gpu[0].num_cpus == 0.5
    none = plan(
        spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"fuse": "none"})}), ClusterShape.single(2)
    )
    assert len(none.groups) == 6 and all(g.num_cpus == 0.5 for g in none.groups)
