"""SAM prompts beyond detector boxes: the sidecar loader, the combination rules and the SAM plumbing.

The tiny random-weight SAM gives noise masks, so prompt semantics are checked on what reaches the model
(the exact ``input_points`` / ``input_labels`` / ``input_boxes`` tensors, cross-checked with
``SamProcessor``); only the ``real_weights`` test looks at what a negative point does to a real mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from promptpaint import manifest
from promptpaint.actors.common import new_rows
from promptpaint.actors.detector import Detector
from promptpaint.actors.maskops import MaskOps
from promptpaint.actors.prompts import (
    PROMPT_LABEL,
    InstancePrompt,
    PromptLoader,
    instance_prompts,
    load_prompt_table,
    merge_instances,
)
from promptpaint.actors.segmenter import Segmenter, box_masks
from promptpaint.config import (
    DetectSpec,
    EditSpec,
    MaskSpec,
    RuntimeSpec,
    SegmentSpec,
    SpecError,
    build_spec,
    load_edit_spec,
)
from promptpaint.jobs.bulk_edit import run_job
from promptpaint.jobs.plan import ClusterShape, plan, with_prompts
from promptpaint.models import is_available
from promptpaint.models.sam import build_sam_prompts, to_model_coords

CPU = RuntimeSpec(device="cpu", dtype="float32")
H, W = 64, 96
# Two touching shapes: A (red) on x in [16, 48), B (blue) on x in [48, 80), both on y in [16, 48).
A_PT, B_PT = [30.0, 32.0], [64.0, 32.0]
BOTH = [16.0, 16.0, 80.0, 48.0]  # a box around A and B


def _touching_shapes(h: int = H, w: int = W) -> np.ndarray:
    img = np.full((h, w, 3), 200, np.uint8)
    sy, sx = h / H, w / W
    img[int(16 * sy) : int(48 * sy), int(16 * sx) : int(48 * sx)] = (220, 30, 30)
    img[int(16 * sy) : int(48 * sy), int(48 * sx) : int(80 * sx)] = (30, 30, 220)
    return img


def _batch(images: list[np.ndarray], paths: list[str], ids: list[str] | None = None) -> dict[str, list]:
    b = new_rows(ids or [f"id{k}" for k in range(len(images))], paths)
    b["image"] = [im.copy() for im in images]
    return b


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


SIDECAR_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("id", pa.string()),
        ("points", pa.list_(pa.list_(pa.float64()))),
        ("labels", pa.list_(pa.int64())),
        ("boxes", pa.list_(pa.list_(pa.float64()))),
    ]
)


def _write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records, schema=SIDECAR_SCHEMA), path)  # absent fields -> nulls
    return path


class _Spy:
    """Wraps SamModel: records the keyword arguments of every forward call, delegates everything."""

    def __init__(self, model: Any):
        self.model, self.calls = model, []

    def __call__(self, **kw: Any) -> Any:
        self.calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        return self.model(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def models_dir(tiny_models: Path) -> str:
    return str(tiny_models)


@pytest.fixture(scope="module")
def segmenter(models_dir: str) -> Segmenter:
    return Segmenter(SegmentSpec(), CPU, models_dir)


@pytest.fixture()
def spy(segmenter: Segmenter):
    s = _Spy(segmenter.backend.model)
    segmenter.backend.model = s
    yield s
    segmenter.backend.model = s.model


# ---------------------------------------------------------------------------------- combination rules


def test_instance_prompts_combination_rules() -> None:
    boxes = np.array([[0, 0, 50, 50], [40, 0, 90, 50]], np.float32)
    points = np.array([[10, 10], [45, 20], [50, 50], [95, 60]], np.float32)  # A only, both, edge of both, none
    labels = np.array([1, 0, 1, 1], np.int64)
    inst = instance_prompts(boxes, points, labels)
    assert [p.kind for p in inst] == [(True, 3), (True, 2)]
    np.testing.assert_array_equal(inst[0].box, boxes[0])
    np.testing.assert_array_equal(inst[0].points, points[[0, 1, 2]])
    np.testing.assert_array_equal(inst[0].labels, [1, 0, 1])
    np.testing.assert_array_equal(inst[1].points, points[[1, 2]])  # the point in no box (95, 60) is unused
    np.testing.assert_array_equal(inst[1].labels, [0, 1])
    # points and no box: one instance prompted by all of them
    only = instance_prompts(np.zeros((0, 4), np.float32), points, labels)
    assert len(only) == 1 and only[0].box is None
    np.testing.assert_array_equal(only[0].points, points)
    np.testing.assert_array_equal(only[0].labels, labels)
    # boxes and no points (no sidecar at all): one box-only instance per box, as before
    assert [p.kind for p in instance_prompts(boxes, None, None)] == [(True, 0), (True, 0)]
    assert instance_prompts(np.zeros((0, 4), np.float32), None, None) == []


def test_merge_instances_adds_sidecar_boxes_and_the_points_only_instance() -> None:
    det = np.array([[1, 2, 3, 4]], np.float32)
    pb = np.array([[5, 6, 7, 8]], np.float32)
    b, lab, s = merge_instances(det, ["car"], np.array([0.6], np.float32), pb, np.zeros((2, 2), np.float32))
    np.testing.assert_array_equal(b, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert lab == ["car", PROMPT_LABEL] and s.tolist() == pytest.approx([0.6, 1.0]) and s.dtype == np.float32
    # points, no box from either source -> one points-only instance (no box)
    b, lab, s = merge_instances(np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32), None, np.ones((3, 2)))
    assert b.shape == (0, 4) and lab == [PROMPT_LABEL] and s.tolist() == [1.0]
    # no sidecar: exactly the detector's output
    b, lab, s = merge_instances(det, ["car"], np.array([0.6], np.float32), None, None)
    np.testing.assert_array_equal(b, det)
    assert lab == ["car"] and s.tolist() == pytest.approx([0.6])


def test_build_sam_prompts_groups_by_kind_and_never_pads_points() -> None:
    box0, box1, box2 = (np.array(v, np.float32) for v in ([0, 0, 10, 10], [20, 0, 40, 10], [5, 5, 30, 30]))
    pts = np.array([[3, 3], [6, 6]], np.float32)
    per_image = [
        [InstancePrompt(box0, pts, np.array([1, 0])), InstancePrompt(box1, np.zeros((0, 2)), np.zeros(0))],
        [InstancePrompt(None, np.array([[1, 2], [3, 4], [5, 6]], np.float32), np.array([1, 1, 0]))],
        [InstancePrompt(box2, np.zeros((0, 2)), np.zeros(0)), InstancePrompt(box0, np.zeros((0, 2)), np.zeros(0))],
    ]
    calls = build_sam_prompts(per_image)
    assert [(c.has_box, c.n_points) for c in calls] == [(True, 0), (True, 2), (False, 3)]
    box_only, box_pts, pts_only = calls
    # box-only: images 0 and 2; image 0 has one such instance, padded with a copy of it to image 2's two
    assert box_only.rows == [0, 2] and box_only.instances == [[1], [0, 1]]
    np.testing.assert_array_equal(box_only.input_boxes, [[box1, box1], [box2, box0]])
    assert box_only.input_points is None and box_only.input_labels is None
    assert box_pts.rows == [0] and box_pts.instances == [[0]]
    np.testing.assert_array_equal(box_pts.input_boxes, [[box0]])
    np.testing.assert_array_equal(box_pts.input_points, [[pts]])
    assert box_pts.input_labels.dtype == np.int64 and box_pts.input_labels.tolist() == [[[1, 0]]]
    assert pts_only.rows == [1] and pts_only.input_boxes is None
    assert pts_only.input_points.shape == (1, 1, 3, 2) and pts_only.input_labels.tolist() == [[[1, 1, 0]]]
    assert all(-10 not in c.input_labels for c in calls if c.input_labels is not None)  # no padding points


def test_to_model_coords_matches_sam_processor(segmenter: Segmenter) -> None:
    img = _touching_shapes(70, 30)
    pts = np.array([[1.5, 2.0], [29.0, 69.5]], np.float32)
    box = np.array([2.0, 3.5, 25.0, 60.0], np.float32)
    enc = segmenter.backend.processor(
        images=[img],
        input_points=[[pts.tolist()]],
        input_labels=[[[1, 0]]],
        input_boxes=[[box.tolist()]],
        return_tensors="pt",
    )
    orig, resized = tuple(enc["original_sizes"][0].tolist()), tuple(enc["reshaped_input_sizes"][0].tolist())
    assert orig == (70, 30) and resized != orig  # the coordinates really are rescaled
    np.testing.assert_array_equal(to_model_coords(pts, orig, resized), enc["input_points"][0, 0].numpy())
    np.testing.assert_array_equal(to_model_coords(box, orig, resized), enc["input_boxes"][0, 0].numpy())


# ------------------------------------------------------------------------ SAM plumbing (tiny weights)


def _prompted_rows(points: list[list[float]], labels: list[int], boxes: list[list[float]]) -> dict[str, list]:
    b = _batch([_touching_shapes()], ["mem/shapes.png"])
    b["boxes"] = [np.array(boxes, np.float32).reshape(-1, 4)]
    b["prompt_points"] = [np.array(points, np.float32).reshape(-1, 2)]
    b["prompt_labels"] = [np.array(labels, np.int64)]
    return b


@pytest.mark.parametrize("boxes", [[BOTH], []], ids=["box", "points-only"])
def test_negative_point_reaches_sam_as_a_label_0_prompt(segmenter: Segmenter, spy: _Spy, boxes) -> None:
    """The issue's case: two touching shapes, a negative point inside one of them."""
    pos = segmenter(_prompted_rows([A_PT], [1], boxes))
    neg = segmenter(_prompted_rows([A_PT, B_PT], [1, 0], boxes))
    assert len(spy.calls) == 2  # one SAM decoder call per batch: one prompt kind each
    before, after = spy.calls
    assert before["input_labels"].tolist() == [[[1]]]
    assert after["input_labels"].tolist() == [[[1, 0]]]  # (image, instance, point): the negative point is there
    assert after["input_labels"].dtype == torch.int64
    # Exactly the coordinates SamProcessor computes for the same prompts (pixels -> SAM's 64 px frame).
    kw = {"input_boxes": [boxes]} if boxes else {}
    ref = segmenter.backend.processor(
        images=[_touching_shapes()], input_points=[[[A_PT, B_PT]]], input_labels=[[[1, 0]]], return_tensors="pt", **kw
    )
    assert after["input_points"].shape == (1, 1, 2, 2) and after["input_points"].dtype == torch.float32
    assert torch.equal(after["input_points"], ref["input_points"].float())
    assert torch.equal(after["input_labels"], ref["input_labels"])
    assert torch.equal(before["input_points"], ref["input_points"][:, :, :1].float())
    if boxes:
        assert torch.equal(after["input_boxes"], ref["input_boxes"].float())
        assert torch.equal(before["input_boxes"], after["input_boxes"])
    else:
        assert "input_boxes" not in after
    # Plumbing to the end: one instance, at the original size; the box instance is clipped to its box.
    for out in (pos, neg):
        assert out["status"] == [""]
        assert out["masks"][0].shape == (1, H, W) and out["masks"][0].dtype == np.bool_
        assert out["mask_scores"][0].shape == (1,) and out["mask_scores"][0].dtype == np.float32
        if boxes:
            assert not (out["masks"][0] & ~box_masks(np.array(boxes), H, W)).any()
    out = MaskOps(MaskSpec(min_area=0, dilate_px=0, feather_px=0))({**neg, "det_scores": [np.ones(1, np.float32)]})
    assert out["mask"][0].shape in ((H, W), (0, 0))  # noise masks may be empty; the shapes must line up


def test_segmenter_mixed_batch_keeps_box_only_rows_as_before(segmenter: Segmenter, spy: _Spy) -> None:
    img0, img1 = _touching_shapes(), _touching_shapes(48, 80)
    plain = _batch([img0], ["mem/plain.png"])
    plain["boxes"] = [np.array([[5, 5, 40, 30], [50, 10, 90, 60]], np.float32)]
    alone = segmenter({k: list(v) for k, v in plain.items()})
    spy.calls.clear()
    mixed = _batch([img0, img1, img1], ["mem/plain.png", "mem/refined.png", "mem/points.png"])
    mixed["boxes"] = [plain["boxes"][0], np.array([[2, 2, 40, 40], [50, 2, 78, 40]], np.float32), np.zeros((0, 4))]
    mixed["prompt_points"] = [np.zeros((0, 2), np.float32), np.array([[10, 10], [60, 20]], np.float32)] + [
        np.array([[10, 10], [20, 20], [30, 30]], np.float32)
    ]
    mixed["prompt_labels"] = [np.zeros(0, np.int64), np.array([1, 0]), np.array([1, 0, 0])]
    out = segmenter(mixed)
    assert out["status"] == ["", "", ""]
    assert [m.shape for m in out["masks"]] == [(2, 64, 96), (2, 48, 80), (1, 48, 80)]
    # three prompt kinds -> three decoder calls on one image-encoder pass: box-only, box + 1 point, 3 points
    kinds = [("input_boxes" in c, tuple(c["input_points"].shape) if "input_points" in c else None) for c in spy.calls]
    assert kinds == [(True, None), (True, (1, 2, 1, 2)), (False, (1, 1, 3, 2))]
    assert tuple(spy.calls[0]["input_boxes"].shape) == (1, 2, 4)  # only the plain row's two boxes
    assert spy.calls[1]["input_labels"].tolist() == [[[1], [0]]]  # each box gets the point inside it
    # The row without sidecar prompts gets what it got alone, without any prompt columns.
    assert np.array_equal(out["masks"][0], alone["masks"][0])
    np.testing.assert_allclose(out["mask_scores"][0], alone["mask_scores"][0], atol=1e-5)


# ---------------------------------------------------------------------------------------- the sidecar

PATHS = ["/data/in/a.jpg", "/data/in/sub/b.png", "/data/in/c.jpg", "/data/in/d.jpg"]
RECORDS = [
    {"path": "/data/in/a.jpg", "points": [[10, 12], [30, 5]], "labels": [1, 0]},  # full path
    {"path": "b.png", "boxes": [[1, 2, 50, 40]]},  # file name
    {"id": "id2", "points": [[5, 5]], "labels": [1], "boxes": [[0, 0, 200, 20]]},  # id; box clipped to the image
]


def _check_loaded(out: dict[str, list]) -> None:
    assert out["status"] == ["", "", "", ""]
    np.testing.assert_array_equal(out["prompt_points"][0], [[10, 12], [30, 5]])
    np.testing.assert_array_equal(out["prompt_labels"][0], [1, 0])
    assert out["prompt_boxes"][0].shape == (0, 4)
    np.testing.assert_array_equal(out["prompt_boxes"][1], [[1, 2, 50, 40]])
    assert out["prompt_points"][1].shape == (0, 2) and out["prompt_labels"][1].shape == (0,)
    np.testing.assert_array_equal(out["prompt_boxes"][2], [[0, 0, W, 20]])
    np.testing.assert_array_equal(out["prompt_points"][2], [[5, 5]])
    for col, dtype, shape in (("prompt_boxes", np.float32, (0, 4)), ("prompt_points", np.float32, (0, 2))):
        assert all(v.dtype == dtype for v in out[col])
        assert out[col][3].shape == shape  # no record: empty prompts
    assert all(v.dtype == np.int64 for v in out["prompt_labels"]) and out["prompt_labels"][3].shape == (0,)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_sidecar_keyed_by_path_file_name_and_id(tmp_path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        f = _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    else:
        f = _write_parquet(tmp_path / "p.parquet", RECORDS)
    loader = PromptLoader(str(f))
    assert len(loader.table) == 3
    _check_loaded(loader(_batch([_touching_shapes()] * 4, PATHS)))


def test_sidecar_lookup_prefers_id_then_path_then_file_name(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"path": "a.jpg", "points": [[1, 1]], "labels": [1]},
            {"path": "/data/in/a.jpg", "points": [[2, 2]], "labels": [1]},
            {"id": "x", "points": [[3, 3]], "labels": [1]},
        ],
    )
    table = load_prompt_table(str(f))
    assert table.lookup("x", "/data/in/a.jpg").points.tolist() == [[3, 3]]
    assert table.lookup("y", "/data/in/a.jpg").points.tolist() == [[2, 2]]
    assert table.lookup("y", "/elsewhere/a.jpg").points.tolist() == [[1, 1]]
    assert table.lookup("y", "/data/in/other.jpg") is None


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"path": "a.jpg", "points": [[1, 2], [3, 4]], "labels": [1]}, "'points' has 2 entries but 'labels' has 1"),
        ({"path": "a.jpg", "points": [[1, 2]]}, "'points' has 1 entries but 'labels' has 0"),
        ({"path": "a.jpg", "points": [[1, 2]], "labels": [2]}, "labels[0] must be 1 (positive) or 0 (negative)"),
        ({"path": "a.jpg", "points": [[1, 2]], "labels": [True]}, "labels[0] must be 1"),
        ({"path": "a.jpg", "points": [[1, 2, 3]], "labels": [1]}, "points[0] must be 2 finite numbers"),
        ({"path": "a.jpg", "boxes": [[1, 2, 3]]}, "boxes[0] must be 4 finite numbers"),
        ({"path": "a.jpg", "boxes": [[10, 2, 3, 40]]}, "boxes[0] = [10.0, 2.0, 3.0, 40.0] is not [x0, y0, x1, y1]"),
        ({"path": "a.jpg", "boxes": [1, 2, 3, 4]}, "boxes[0] must be 4 finite numbers"),
        ({"points": [[1, 2]], "labels": [1]}, "neither 'path' nor 'id'"),
        ({"path": "a.jpg", "point": [[1, 2]]}, "unknown field(s) ['point']"),
        ("[1, 2]", "a record must be an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_jsonl_record_is_an_error_naming_file_line_and_problem(tmp_path: Path, record, problem) -> None:
    f = _write_jsonl(tmp_path / "bad.jsonl", [{"path": "ok.jpg"}, "", record])
    with pytest.raises(ValueError) as err:
        PromptLoader(str(f))
    msg = str(err.value)
    assert str(f) in msg and "line 3" in msg and problem in msg, msg


def test_malformed_parquet_record_and_duplicates_and_missing_file(tmp_path: Path) -> None:
    f = _write_parquet(
        tmp_path / "bad.parquet",
        [{"path": "a.jpg", "labels": [1], "points": [[1, 2]]}, {"path": "b.jpg", "labels": [0, 1], "points": [[1, 2]]}],
    )
    with pytest.raises(ValueError, match=r"bad\.parquet' row 2: 'points' has 1 entries but 'labels' has 2"):
        PromptLoader(str(f))
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"path": "a.jpg"}, {"path": "b.jpg"}, {"path": "a.jpg"}])
    with pytest.raises(ValueError, match=r"line 3: path 'a.jpg' is already used by line 1"):
        PromptLoader(str(dup))
    with pytest.raises(ValueError, match="unknown format"):
        PromptLoader(str(_write_jsonl(tmp_path / "p.csv", [{"path": "a.jpg"}])))
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"segment.points_file '{missing}' does not exist"):
        PromptLoader(str(missing))
    with pytest.raises(SpecError, match=r"segment\.points_file: .*nope\.jsonl' does not exist"):
        build_spec(EditSpec, {"input": "x", "output": "y", "segment": {"points_file": str(missing)}})


def test_prompt_outside_its_image_fails_that_row_only(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"path": "a.jpg", "points": [[10, 500]], "labels": [1]},
            {"path": "b.jpg", "boxes": [[200, 0, 300, 10]]},
            {"path": "c.jpg", "points": [[10, 10]], "labels": [1]},
        ],
    )
    out = PromptLoader(str(f))(_batch([_touching_shapes()] * 3, ["/i/a.jpg", "/i/b.jpg", "/i/c.jpg"]))
    assert out["status"] == ["error", "error", ""]
    assert out["error_kind"][:2] == ["bad_prompt"] * 2 and out["error_stage"][:2] == ["prompts"] * 2
    assert "line 1: point [10.0, 500.0] lies outside the 96x64 image" in out["error_message"][0]
    assert "line 2: box [200.0, 0.0, 300.0, 10.0] covers less than 1 px" in out["error_message"][1]
    assert out["prompt_points"][2].tolist() == [[10, 10]]


# ------------------------------------------------------------------------------- detector and the job


def test_detector_keeps_prompted_rows_active_without_detections(models_dir: str) -> None:
    b = _batch([_touching_shapes()] * 3, ["/i/pts.png", "/i/box.png", "/i/none.png"])
    b["prompt_points"] = [np.array([A_PT], np.float32), np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)]
    b["prompt_labels"] = [np.ones(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)]
    b["prompt_boxes"] = [np.zeros((0, 4), np.float32), np.array([BOTH], np.float32), np.zeros((0, 4), np.float32)]
    out = Detector(DetectSpec(queries=["car"], threshold=1.0), CPU, models_dir)(b)
    assert out["status"] == ["", "", "no_detection"]
    assert out["boxes"][0].shape == (0, 4) and out["labels"][0] == [PROMPT_LABEL]
    assert out["det_scores"][0].tolist() == [1.0]
    np.testing.assert_array_equal(out["boxes"][1], [BOTH])
    assert out["labels"][1] == [PROMPT_LABEL] and out["boxes"][1].dtype == np.float32
    assert out["labels"][2] == [] and out["det_scores"][2].shape == (0,)


def test_points_only_image_is_edited_in_a_local_job(tiny_models: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_touching_shapes()).save(inputs / "shapes.png")
    Image.fromarray(_touching_shapes()[::-1].copy()).save(inputs / "plain.png")
    sidecar = _write_jsonl(
        tmp_path / "points.jsonl", [{"path": "shapes.png", "points": [A_PT, B_PT], "labels": [1, 0]}]
    )
    spec = EditSpec(
        input=str(inputs),
        output=str(tmp_path / "out"),
        models_dir=str(tiny_models),
        detect={"queries": ["car"], "threshold": 1.0},  # the detector finds nothing
        segment={"points_file": str(sidecar)},
        mask={"min_area": 1},
        inpaint={"steps": 2},
        runtime={"executor": "local", "device": "cpu"},
        lineage={"mode": "off"},
    )
    assert with_prompts(spec, spec.stages()) == ["read", "prompts", "detect", "segment", "mask", "inpaint", "write"]
    gpu = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"device": "auto"})})
    assert plan(gpu, ClusterShape.single(4, 1)).groups[1].stages == ("prompts", "detect", "segment", "mask", "inpaint")
    assert plan(spec, ClusterShape.single(4)).groups[0].stages[:3] == ("read", "prompts", "detect")
    result = run_job(spec, progress=False)
    assert result.counts == {"skipped": 0, "edited": 1, "no_detection": 1}, result.counts
    rows = {Path(r["input_path"]).name: r for r in manifest.read_manifest(str(tmp_path / "out")).to_pylist()}
    edited = rows["shapes.png"]
    assert edited["status"] == "edited" and edited["instances"] == 1 and edited["mask_area"] > 0
    assert edited["labels"] == [PROMPT_LABEL] and edited["det_scores"] == [1.0] and edited["boxes"] == []
    assert rows["plain.png"]["status"] == "no_detection"  # no record: exactly as without a sidecar


def test_points_file_in_a_spec_resolves_against_the_spec(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    _write_jsonl(tmp_path / "specs" / "p.jsonl", [])
    spec_file = tmp_path / "specs" / "s.yaml"
    spec_file.write_text("input: in\noutput: out\nsegment:\n  points_file: p.jsonl\n")
    assert load_edit_spec(spec_file).segment.points_file == str(tmp_path / "specs" / "p.jsonl")
    assert load_edit_spec(spec_file, [f"segment.points_file={tmp_path / 'specs' / 'p.jsonl'}"])


# ------------------------------------------------------------------------------------------ real SAM


@pytest.mark.real_weights
@pytest.mark.skipif(not is_available("sam", None), reason="facebook/sam-vit-base is not in the HF cache")
def test_real_sam_negative_point_excludes_the_touching_shape() -> None:
    seg = Segmenter(SegmentSpec(multimask="single", clip_to_box=True), CPU, None)  # points disambiguate
    img = _touching_shapes(256, 384)  # shapes scale with the image: A x in [64, 192), B in [192, 320)
    s = 4.0
    box = [v * s for v in BOTH]
    a_pt, b_pt = [A_PT[0] * s, A_PT[1] * s], [B_PT[0] * s, B_PT[1] * s]

    def mask(points, labels):
        b = _batch([img], ["mem/shapes.png"])
        b["boxes"] = [np.array([box], np.float32)]
        b["prompt_points"] = [np.array(points, np.float32).reshape(-1, 2)]
        b["prompt_labels"] = [np.array(labels, np.int64)]
        return seg(b)["masks"][0][0]

    a = np.zeros(img.shape[:2], bool)
    a[64:192, 64:192] = True
    b = np.zeros_like(a)
    b[64:192, 192:320] = True
    both = mask([a_pt, b_pt], [1, 1])
    without_b = mask([a_pt, b_pt], [1, 0])
    assert both[b].mean() > 0.5  # positive points on both: B is in the mask
    assert without_b[a].mean() > 0.8  # A stays
    assert without_b[b].mean() < 0.2  # the negative point inside B takes it out
