"""Job modes (detect, segment) with COCO export, and multi-query edits with a prompt per query."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from promptpaint import coco, manifest
from promptpaint.actors.inpainter import Inpainter
from promptpaint.actors.maskops import MaskOps
from promptpaint.config import EditSpec, InpaintSpec, MaskSpec, RuntimeSpec, build_spec
from promptpaint.jobs.bulk_edit import Chain, run_job
from promptpaint.jobs.plan import ClusterShape, plan
from promptpaint.samples import make_samples

CPU = RuntimeSpec(device="cpu")
QUERIES = ["a car", "a dog"]


def _spec(inputs: Path, output: Path, models: Path, mode: str, **extra: object) -> EditSpec:
    return build_spec(
        EditSpec,
        {
            "input": str(inputs),
            "output": str(output),
            "models_dir": str(models),
            "mode": mode,
            "detect": {"queries": QUERIES, "threshold": 0.55, "top_k": 4},
            "lineage": {"mode": "off"},
            "runtime": {"executor": "local", "device": "cpu", "batch_size": {"detect": 4, "segment": 4}},
            **extra,
        },
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("modes_in")
    make_samples(folder, 8, size=(96, 72), seed=5, broken=True)
    return folder


# --------------------------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (33, 1)])
def test_rle_round_trip_is_exact(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for mask in (
        rng.random(shape) > 0.5,
        np.zeros(shape, bool),
        np.ones(shape, bool),
        np.pad(np.ones((1, 1), bool), ((0, shape[0] - 1), (shape[1] - 1, 0))),  # one pixel, top right
    ):
        rle = coco.encode_rle(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        json.dumps(rle)  # JSON-ready
        np.testing.assert_array_equal(coco.decode_rle(rle), mask)
        area, bbox = coco.rle_area_bbox(rle)
        assert area == int(mask.sum())
        if area:
            ys, xs = np.nonzero(mask)
            assert bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


# ----------------------------------------------------------------------------------------- segment


def test_segment_mode_writes_label_maps_rle_and_valid_coco(tiny_models: Path, corpus: Path, tmp_path: Path) -> None:
    spec = _spec(corpus, tmp_path / "out", tiny_models, "segment")
    assert spec.stages() == ["read", "detect", "segment", "write"]
    result = run_job(spec, progress=False)
    rows = manifest.read_manifest(spec.output).to_pylist()
    statuses = {r["status"] for r in rows}
    assert "segmented" in statuses and statuses <= {"segmented", "no_detection", "error"}
    assert not (tmp_path / "out" / "images").exists()  # nothing is repainted in segment mode

    # The masks in the manifest are exactly the segmenter's masks (same stages, run directly).
    seg = [r for r in rows if r["status"] == "segmented"]
    direct = Chain(spec, ["read", "detect", "segment"])({"path": [r["input_path"] for r in seg]})
    for k, r in enumerate(seg):
        decoded = np.stack([coco.decode_rle(x) for x in r["rles"]])
        np.testing.assert_array_equal(decoded, direct["masks"][k])
        assert r["instances"] == len(r["labels"]) == len(r["rles"]) == len(r["boxes"])
        assert r["mask_area"] == int(decoded.any(0).sum())
        # The label map PNG: 0 background, k+1 where instance k is (later instances win overlaps).
        lab = np.asarray(Image.open(r["mask_path"]))
        want = np.zeros(decoded.shape[1:], np.uint8)
        for j, m in enumerate(decoded):
            want[m] = j + 1
        np.testing.assert_array_equal(lab, want)

    # COCO: pycocotools loads it; every annotation's mask decodes to the manifest's instance mask.
    path = tmp_path / "out" / coco.COCO_FILE
    assert result.summary["coco"]["path"] == str(path)
    gt = COCO(str(path))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == QUERIES
    by_id = {img["promptpaint_id"]: img for img in gt.dataset["images"]}
    assert set(by_id) == {r["id"] for r in rows if r["status"] in ("segmented", "no_detection")}
    n_ann = 0
    for r in seg:
        img = by_id[r["id"]]
        assert (img["width"], img["height"]) == (r["width"], r["height"])
        assert img["file_name"] == Path(r["input_path"]).relative_to(corpus).as_posix()
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(r["rles"])
        for a, rle, label, box in zip(anns, r["rles"], r["labels"], r["boxes"], strict=True):
            np.testing.assert_array_equal(gt.annToMask(a).astype(bool), coco.decode_rle(rle))
            assert gt.cats[a["category_id"]]["name"] == label
            assert a["area"] == int(coco.decode_rle(rle).sum())
            np.testing.assert_allclose(a["bbox"], [box[0], box[1], box[2] - box[0], box[3] - box[1]], rtol=1e-6)
        n_ann += len(anns)
    assert n_ann == result.summary["coco"]["annotations"] > 0
    # COCO results API: the annotations load back as detections with scores (what evaluation tools use).
    res = gt.loadRes([{k: v for k, v in a.items() if k != "id"} for a in gt.dataset["annotations"]])
    assert len(res.getAnnIds()) == n_ann


def test_segment_label_map_goes_16_bit_past_255_instances() -> None:
    from promptpaint.actors.writer import label_map
    from promptpaint.io import encode_mask_png

    masks = np.zeros((300, 20, 20), bool)
    for k in range(300):
        masks[k].flat[k] = True
    lab = label_map(masks)
    assert lab.dtype == np.uint16 and lab.max() == 300
    import io

    back = np.asarray(Image.open(io.BytesIO(encode_mask_png(lab))))
    np.testing.assert_array_equal(back.astype(np.uint16), lab)


# ------------------------------------------------------------------------------------------ detect


def test_detect_mode_on_ray_exports_boxes(tiny_models: Path, corpus: Path, tmp_path: Path, ray_session) -> None:
    spec = _spec(corpus, tmp_path / "out", tiny_models, "detect", runtime={"executor": "ray", "device": "cpu"})
    gpu = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"device": "auto"})})
    assert [g.stages for g in plan(gpu, ClusterShape.single(4, 1)).groups] == [("read",), ("detect",), ("write",)]
    result = run_job(spec, progress=False)
    rows = manifest.read_manifest(spec.output).to_pylist()
    assert {r["status"] for r in rows} <= {"detected", "no_detection", "error"}
    assert result.counts.get("detected", 0) > 0
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "masks").exists()
    data = json.loads((tmp_path / "out" / coco.COCO_FILE).read_text())
    gt = COCO(str(tmp_path / "out" / coco.COCO_FILE))  # validates indexes and references
    anns = {img["promptpaint_id"]: gt.loadAnns(gt.getAnnIds(imgIds=[img["id"]])) for img in data["images"]}
    for r in rows:
        if r["status"] != "detected":
            continue
        got = [a["bbox"] for a in anns[r["id"]]]
        want = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in r["boxes"]]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert [a["score"] for a in anns[r["id"]]] == pytest.approx(r["det_scores"])
        assert all("segmentation" not in a for a in anns[r["id"]])
    # Re-running adds nothing and rewrites the same export.
    again = run_job(spec, progress=False)
    assert again.counts == {"skipped": len(rows)}
    assert json.loads((tmp_path / "out" / coco.COCO_FILE).read_text()) == data


def test_export_leaves_out_rows_of_other_specs(tiny_models: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = _spec(corpus, out, tiny_models, "detect")
    b = _spec(corpus, out, tiny_models, "detect", detect={"queries": ["a dog"], "threshold": 0.5})
    run_job(a, progress=False)
    first = json.loads((out / coco.COCO_FILE).read_text())
    run_job(b, progress=False)
    second = json.loads((out / coco.COCO_FILE).read_text())
    assert [c["name"] for c in second["categories"]] == ["a dog"]
    assert len(second["images"]) == len(first["images"])  # b's rows only, not a's as well


# ------------------------------------------------------------------------------------- multi-query


def _two_objects() -> tuple[np.ndarray, np.ndarray]:
    """A 64x96 image with two separated squares and their instance masks (2, 64, 96)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    masks = np.zeros((2, 64, 96), bool)
    masks[0, 10:26, 8:24] = True
    masks[1, 36:56, 66:86] = True
    return image, masks


class _Recorder:
    """Records each pipeline call's prompt and mask, then runs the real pipeline."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kw):
        self.calls.append({"prompt": kw["prompt"], "masks": [np.asarray(m) > 0 for m in kw["mask_image"]]})
        return self.pipe(**kw)


def test_multi_query_edit_applies_each_prompt_to_its_own_objects(tiny_models: Path) -> None:
    image, masks = _two_objects()
    spec = build_spec(
        EditSpec,
        {
            "input": "x",
            "output": "y",
            "detect": {"queries": [{"text": "car", "prompt": "a bicycle"}, {"text": "person", "prompt": "a statue"}]},
            "inpaint": {"steps": 2, "padding": 0.0},
        },
    )
    rows = {
        **_one_row(image),
        "masks": [masks],
        "labels": [["car", "person"]],
        "det_scores": [np.array([0.9, 0.8], np.float32)],
    }
    ops = MaskOps(MaskSpec(dilate_px=0, feather_px=0, min_area=1), spec.edit_prompts())
    rows = ops(rows)
    assert [p[0] for p in rows["pass_prompts"][0]] == ["a bicycle", "a statue"]
    np.testing.assert_array_equal(rows["pass_blends"][0][0] > 0, masks[0])
    np.testing.assert_array_equal(rows["pass_blends"][0][1] > 0, masks[1])
    np.testing.assert_array_equal(rows["mask"][0], masks.any(0))

    inp = Inpainter(InpaintSpec(steps=2, padding=0.0), CPU, str(tiny_models))
    rec = inp.pipe = _Recorder(inp.pipe)
    out = inp(rows)
    assert [c["prompt"] for c in rec.calls] == [["a bicycle"], ["a statue"]]
    # Each call's crop is its own object's box (padding 0), and its mask covers that object only.
    assert out["crops"][0] == [[10, 26, 8, 24], [36, 56, 66, 86]]
    assert out["edit_prompts"][0] == ["a bicycle", "a statue"]
    assert all(c["masks"][0].all() for c in rec.calls)  # the whole crop is that object's mask
    edited = out["edited"][0]
    untouched = ~masks.any(0)
    np.testing.assert_array_equal(edited[untouched], image[untouched])
    for m in masks:
        assert (edited[m] != image[m]).any()
    # Same result as the two passes run one after the other by hand, each with its own prompt only.
    inp.pipe = rec.pipe
    first = inp(_single(image, masks[0], "a bicycle"))["edited"][0]
    assert np.array_equal(first[masks[0]], edited[masks[0]])


def _one_row(image: np.ndarray) -> dict:
    """A batch of one row, as the reader leaves it."""
    return {
        "id": ["img"],
        "path": ["img.png"],
        "status": [""],
        "error_stage": [""],
        "error_kind": [""],
        "error_message": [""],
        "image": [image],
    }


def _single(image: np.ndarray, mask: np.ndarray, prompt: str) -> dict:
    """One row with one inpaint pass over ``mask`` with ``prompt``."""
    return {
        **_one_row(image),
        "blend": [mask.astype(np.float32)],
        "pass_blends": [[mask.astype(np.float32)]],
        "pass_prompts": [[[prompt, InpaintSpec().negative_prompt]]],
    }


def test_queries_sharing_a_prompt_are_one_pass(tiny_models: Path) -> None:
    image, masks = _two_objects()
    spec = build_spec(EditSpec, {"input": "x", "output": "y", "detect": {"queries": ["car", "person"]}})
    rows = MaskOps(MaskSpec(dilate_px=0, feather_px=0, min_area=1), spec.edit_prompts())(
        {
            "id": ["img"],
            "status": [""],
            "error_message": [""],
            "masks": [masks],
            "labels": [["car", "person"]],
            "det_scores": [np.ones(2, np.float32)],
        }
    )
    assert len(rows["pass_blends"][0]) == 1 and rows["pass_prompts"][0] == [
        [spec.inpaint.prompt, "blurry, low quality, distorted"]
    ]


def test_per_query_thresholds_filter_each_query(tiny_models: Path, corpus: Path, tmp_path: Path) -> None:
    base = _spec(
        corpus, tmp_path / "a", tiny_models, "detect", detect={"queries": QUERIES, "threshold": 0.0, "top_k": 1000}
    )
    strict = _spec(
        corpus,
        tmp_path / "b",
        tiny_models,
        "detect",
        detect={"queries": [{"text": "a car", "threshold": 0.6}, "a dog"], "threshold": 0.0, "top_k": 1000},
    )
    paths = [str(p) for p in sorted(corpus.glob("*.jpg"))[:4]]
    all_ = Chain(base, ["read", "detect"])({"path": paths})
    some = Chain(strict, ["read", "detect"])({"path": paths})
    for k in range(len(paths)):
        want = [
            (lab, s)
            for lab, s in zip(all_["labels"][k], all_["det_scores"][k], strict=True)
            if lab == "a dog" or s >= 0.6
        ]
        assert list(zip(some["labels"][k], some["det_scores"][k], strict=True)) == want
    assert any("a car" in lab for lab in all_["labels"]) and any(
        s < 0.6
        for lab, ss in zip(all_["labels"], all_["det_scores"], strict=True)
        for la, s in zip(lab, ss, strict=True)
        if la == "a car"
    )


# ------------------------------------------------------------------------------------ prompt weighting


def test_inpainter_prompt_weighting_with_compel(tiny_models: Path) -> None:
    image, masks = _two_objects()
    rows = lambda: _single(image, masks[0], "a red car")  # noqa: E731

    def run(weighting: str, prompt: str) -> np.ndarray:
        inp = Inpainter(InpaintSpec(steps=2, prompt_weighting=weighting), CPU, str(tiny_models))
        b = rows()
        b["pass_prompts"] = [[[prompt, "blurry"]]]
        return inp(b)["edited"][0].astype(np.int16)

    plain = run("none", "a red car")
    # No weights in the text: compel's embeddings are the pipeline's own, so the pixels agree (up to float noise).
    assert np.abs(run("compel", "a red car") - plain).max() <= 2
    # A weight changes the conditioning, and so the pixels, only where the mask is.
    weighted = run("compel", "a (red)1.8 car")
    assert np.abs(weighted - plain)[masks[0]].max() > 2
    np.testing.assert_array_equal(weighted[~masks[0]], plain[~masks[0]])


# ------------------------------------------------------------------------------------------------- qc


def test_qc_scores_every_edit_and_rejects_below_min_score(tiny_models: Path, corpus: Path, tmp_path: Path) -> None:
    def job(out: str, min_score: float | None) -> tuple[dict, list[dict]]:
        spec = _spec(
            corpus,
            tmp_path / out,
            tiny_models,
            "edit",
            inpaint={"steps": 2},
            qc={"enabled": True, "min_score": min_score},
        )
        assert spec.stages()[-2:] == ["score", "write"]
        return run_job(spec, progress=False).counts, manifest.read_manifest(spec.output).to_pylist()

    counts, rows = job("keep", None)  # record only
    edited = [r for r in rows if r["status"] == "edited"]
    assert edited and counts.get("qc_failed", 0) == 0
    for r in edited:
        assert len(r["clip_scores"]) == len(r["crops"]) == len(r["edit_prompts"]) >= 1
        assert r["clip_score"] == pytest.approx(min(r["clip_scores"])) and 0.0 <= r["clip_score"] <= 100.0
    # A threshold above every score: the same rows fail QC, go to rejected/ and stay out of images/.
    counts, rows = job("strict", 100.0)
    failed = [r for r in rows if r["status"] == "qc_failed"]
    assert {r["input_path"] for r in failed} == {r["input_path"] for r in edited}  # ids differ: the spec did
    assert counts["qc_failed"] == len(edited)
    assert not (tmp_path / "strict" / "images").exists()
    for r in failed:
        assert Path(r["output_path"]).parent.name == "rejected" and Path(r["output_path"]).is_file()
        assert r["error_kind"] == "qc_failed" and "100" in r["error_message"]


def test_multimask_all_keeps_every_candidate_aligned(tiny_models: Path, corpus: Path, tmp_path: Path) -> None:
    best = _spec(corpus, tmp_path / "best", tiny_models, "segment")
    every = _spec(corpus, tmp_path / "all", tiny_models, "segment", segment={"multimask": "all"})
    paths = [str(p) for p in sorted(corpus.glob("sample_*"))[:3]]
    one = Chain(best, ["read", "detect", "segment"])({"path": paths})
    out = Chain(every, ["read", "detect", "segment"])({"path": paths})
    for k in range(len(paths)):
        n = len(one["labels"][k])
        assert out["masks"][k].shape[0] == 3 * n == len(out["mask_scores"][k]) == len(out["det_scores"][k])
        assert out["labels"][k] == [lab for lab in one["labels"][k] for _ in range(3)]
        np.testing.assert_array_equal(out["boxes"][k], np.repeat(one["boxes"][k], 3, axis=0))
        # "best" picked one of the three candidates of each instance, with its score.
        for j in range(n):
            cands = out["masks"][k][3 * j : 3 * j + 3]
            assert any(np.array_equal(c, one["masks"][k][j]) for c in cands)
            assert one["mask_scores"][k][j] == pytest.approx(out["mask_scores"][k][3 * j : 3 * j + 3].max())
    # Through the job: one COCO annotation per candidate.
    result = run_job(every, progress=False)
    data = json.loads((tmp_path / "all" / coco.COCO_FILE).read_text())
    rows = manifest.read_manifest(every.output).to_pylist()
    assert len(data["annotations"]) == sum(len(r["rles"]) for r in rows if r["status"] == "segmented")
    assert result.summary["coco"]["annotations"] == len(data["annotations"]) > 0


def test_coco_build_handles_points_only_instances() -> None:
    # A sidecar image with points and no box: one "prompt" instance without a box. Detect mode has nothing to
    # export for it; segment mode exports its mask with the mask's own bbox.
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    row = {
        "id": "a",
        "input_path": "/in/a.png",
        "status": "detected",
        "width": 10,
        "height": 8,
        "boxes": [],
        "labels": ["prompt"],
        "det_scores": [1.0],
    }
    det = coco.build([row], "detect", ["car"], "/in")
    assert det["annotations"] == [] and [c["name"] for c in det["categories"]] == ["car", "prompt"]
    seg = coco.build(
        [{**row, "status": "segmented", "rles": [coco.encode_rle(mask)], "mask_scores": [0.9]}],
        "segment",
        ["car"],
        "/in",
    )
    (ann,) = seg["annotations"]
    assert ann["bbox"] == [3.0, 2.0, 4.0, 3.0] and ann["area"] == 12 and ann["category_id"] == 2
    assert seg["images"][0]["file_name"] == "a.png"
