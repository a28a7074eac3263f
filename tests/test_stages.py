"""Every stage on its own, in a plain for-loop over the tiny random-weight models (no Ray).

Stages are built with ``RuntimeSpec(device="cpu")`` (cpu/fp32) and ``models_dir=<tiny set>``. The tests check the
row contract (columns, dtypes, shapes, statuses, pass-through of inactive rows) and the pixel guarantees: pixels
outside the feathered mask are bit-identical to the input, and results do not depend on the batch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from promptpaint.actors.common import derive_seed, new_rows
from promptpaint.actors.detector import Detector
from promptpaint.actors.inpainter import ASPECT_BUCKETS, Crop, Inpainter, paste, plan_crop
from promptpaint.actors.maskops import MaskOps, dilate_and_feather, select_instances
from promptpaint.actors.reader import Reader
from promptpaint.actors.segmenter import Segmenter, box_masks
from promptpaint.actors.writer import MANIFEST_COLUMNS, TIMING_STAGES, Writer, blend_to_mask_png
from promptpaint.config import (
    DetectSpec,
    EditSpec,
    InpaintSpec,
    LimitsSpec,
    MaskSpec,
    RuntimeSpec,
    SegmentSpec,
)
from promptpaint.io import content_id, read_png_text
from promptpaint.jobs.bulk_edit import Chain
from promptpaint.samples import make_samples

CPU = RuntimeSpec(device="cpu", dtype="float32")
SPEC_HASH = "0123456789abcdef"
# The tiny OWL's scores sit around 0.50-0.62: this keeps some boxes and drops others.
THRESHOLD = 0.55
QUERIES = ["car", "dog"]


# --------------------------------------------------------------------------------------------- helpers


def _save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradient with a bright rectangle: structured, so inpainting changes are visible."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = np.broadcast_to((c0 * (1 - t) + c1 * t).astype(np.uint8), (h, w, 3)).copy()
    img[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def _rect_blend(h: int, w: int, y0: int, y1: int, x0: int, x1: int, dilate: int = 2, feather: int = 3):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return dilate_and_feather(m, dilate, feather)


def _rows(images: list[np.ndarray], ids: list[str], blends: list[np.ndarray] | None = None) -> dict[str, list]:
    b = new_rows(ids, [f"mem/{i}.png" for i in ids])
    b["image"] = [im.copy() for im in images]
    b["alpha"] = [np.zeros((0, 0), np.uint8) for _ in images]
    if blends is not None:
        b["blend"] = [bl.copy() for bl in blends]
    return b


def _read(paths: list[Path | str], spec_hash: str = SPEC_HASH, **kw) -> dict[str, list]:
    return Reader(LimitsSpec(), spec_hash, **kw)({"path": [str(p) for p in paths]})


def _concat(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    assert set(a) == set(b)
    return {k: list(a[k]) + list(b[k]) for k in a}


def _row_snapshot(batch: dict[str, list], i: int) -> dict:
    return {k: copy.deepcopy(v[i]) for k, v in batch.items() if not k.startswith("t_")}


def _assert_row_unchanged(before: dict, batch: dict[str, list], i: int) -> None:
    for k, v in before.items():
        now = batch[k][i]
        if isinstance(v, np.ndarray):
            assert isinstance(now, np.ndarray) and now.dtype == v.dtype and np.array_equal(now, v), k
        else:
            assert now == v, k


def _decode_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im).copy()


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_dir(tiny_models: Path) -> str:
    return str(tiny_models)


@pytest.fixture(scope="module")
def inpainter(models_dir: str) -> Inpainter:
    return Inpainter(InpaintSpec(steps=2, seed=0), CPU, models_dir)


@pytest.fixture(scope="module")
def detector(models_dir: str) -> Detector:
    return Detector(DetectSpec(queries=QUERIES, threshold=THRESHOLD, top_k=10), CPU, models_dir)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two JPEG/PNG pairs of different sizes plus a truncated JPEG, an empty file and a text file."""
    folder = tmp_path_factory.mktemp("samples")
    paths = make_samples(folder / "a", n=2, size=(96, 64), seed=1)
    paths += make_samples(folder / "b", n=2, size=(48, 80), seed=2, broken=True)
    return paths


# -------------------------------------------------------------------------------------------------- Reader


def test_reader_decodes_pixels_and_content_ids(tmp_path: Path) -> None:
    img = _noise(20, 30, 0)
    a = _save_png(tmp_path / "a.png", img)
    copy_of_a = tmp_path / "sub" / "copy.png"
    copy_of_a.parent.mkdir()
    copy_of_a.write_bytes(a.read_bytes())
    other = _save_png(tmp_path / "b.png", _noise(20, 30, 1))

    b = _read([a, copy_of_a, other])
    assert b["status"] == ["", "", ""]
    assert b["id"][0] == b["id"][1] == content_id(a.read_bytes(), SPEC_HASH)  # same bytes -> same id
    assert b["id"][2] != b["id"][0]
    assert len(b["id"][0]) == 64 and int(b["id"][0], 16) >= 0
    assert b["path"] == [str(a), str(copy_of_a), str(other)]
    assert b["image"][0].dtype == np.uint8 and b["image"][0].shape == (20, 30, 3)
    assert np.array_equal(b["image"][0], img)  # lossless PNG -> exact pixels
    assert b["alpha"][0].shape == (0, 0)  # no transparency in the input
    assert (b["height"][0], b["width"][0]) == (20, 30)

    # The same bytes under another spec are another job's output: another id.
    b2 = _read([a], spec_hash="fedcba9876543210")
    assert b2["id"][0] != b["id"][0]
    assert b2["id"][0] == content_id(a.read_bytes(), "fedcba9876543210")


def test_reader_broken_files_are_typed_error_rows(sample_files: list[Path], tmp_path: Path) -> None:
    by_name = {p.name: p for p in sample_files}
    paths = [
        sample_files[0],  # a/sample_0000.jpg, 96 x 64
        by_name["broken_truncated.jpg"],
        by_name["broken_empty.png"],
        by_name["broken_text.jpg"],
        tmp_path / "does_not_exist.png",
    ]
    b = _read(paths)  # must not raise
    assert b["status"] == ["", "error", "error", "error", "error"]
    assert b["error_stage"] == ["", "read", "read", "read", "read"]
    assert b["error_kind"] == ["", "truncated", "empty", "undecodable", "io_error"]
    assert all(msg for msg in b["error_message"][1:]) and b["error_message"][0] == ""
    for i in range(1, 5):
        assert b["image"][i].shape == (0, 0, 3) and b["image"][i].dtype == np.uint8
        assert (b["width"][i], b["height"][i]) == (0, 0)
    # Readable-but-broken files still get their content id; a missing one a stable non-empty id.
    assert b["id"][1] == content_id(by_name["broken_truncated.jpg"].read_bytes(), SPEC_HASH)
    assert b["id"][4] and b["id"][4] == _read([paths[4]])["id"][0]
    assert len(set(b["id"])) == 5
    assert b["image"][0].shape == (64, 96, 3)


def test_reader_done_ids_are_skipped_undecoded(tmp_path: Path) -> None:
    a = _save_png(tmp_path / "a.png", _noise(10, 12, 0))
    c = _save_png(tmp_path / "c.png", _noise(10, 12, 1))
    done = frozenset({content_id(a.read_bytes(), SPEC_HASH)})
    b = _read([a, c], done_ids=done)
    assert b["status"] == ["skipped", ""]
    assert b["id"][0] in done
    assert b["image"][0].shape == (0, 0, 3)  # not decoded
    assert b["image"][1].shape == (10, 12, 3)
    assert b["error_kind"] == ["", ""]


# ------------------------------------------------------------------------------------------------ Detector


def test_detector_columns_shapes_and_ordering(detector: Detector, sample_files: list[Path]) -> None:
    b = detector(_read(sample_files))
    n = len(sample_files)
    assert all(len(b[c]) == n for c in ("boxes", "labels", "det_scores", "t_detect_ms"))
    good = [i for i in range(n) if b["error_kind"][i] == ""]
    assert len(good) == 4
    n_boxes = 0
    for i in good:
        boxes, scores, labels = b["boxes"][i], b["det_scores"][i], b["labels"][i]
        h, w = b["image"][i].shape[:2]
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        assert scores.dtype == np.float32 and scores.shape == (len(boxes),)
        assert len(labels) == len(boxes) and set(labels) <= set(QUERIES)
        assert len(boxes) <= 10
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
        assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
        assert np.all(boxes[:, 2] - boxes[:, 0] >= 1) and np.all(boxes[:, 3] - boxes[:, 1] >= 1)
        assert np.all(np.diff(scores) <= 0)  # sorted, best first
        assert np.all(scores > THRESHOLD)
        assert b["status"][i] == ("" if len(boxes) else "no_detection")
        n_boxes += len(boxes)
    assert n_boxes > 0  # the threshold leaves some boxes on the tiny model
    # Rows that failed in the reader keep their error and get empty detection columns.
    for i in set(range(n)) - set(good):
        assert b["status"][i] == "error" and b["error_stage"][i] == "read"
        assert b["boxes"][i].shape == (0, 4) and b["det_scores"][i].shape == (0,) and b["labels"][i] == []


def test_detector_threshold_and_top_k(models_dir: str, sample_files: list[Path]) -> None:
    paths = [p for p in sample_files if p.name.startswith("sample_")]
    all_boxes = Detector(DetectSpec(queries=QUERIES, threshold=0.0, top_k=1000), CPU, models_dir)(_read(paths))
    thresh = Detector(DetectSpec(queries=QUERIES, threshold=THRESHOLD, top_k=1000), CPU, models_dir)(_read(paths))
    top3 = Detector(DetectSpec(queries=QUERIES, threshold=0.0, top_k=3), CPU, models_dir)(_read(paths))
    dropped = kept = 0
    for i in range(len(paths)):
        ab, asc = all_boxes["boxes"][i], all_boxes["det_scores"][i]
        assert len(ab) > 3
        # threshold: exactly the unthresholded boxes scoring above it, in the same order
        sel = asc > THRESHOLD
        np.testing.assert_allclose(thresh["boxes"][i], ab[sel], atol=1e-4)
        np.testing.assert_allclose(thresh["det_scores"][i], asc[sel], atol=1e-6)
        assert thresh["labels"][i] == [lab for lab, s in zip(all_boxes["labels"][i], sel, strict=True) if s]
        dropped += int((~sel).sum())
        kept += int(sel.sum())
        # top_k: the k best of the full list
        assert len(top3["boxes"][i]) == 3
        np.testing.assert_allclose(top3["boxes"][i], ab[:3], atol=1e-4)
        np.testing.assert_allclose(top3["det_scores"][i], asc[:3], atol=1e-6)
    assert dropped > 0 and kept > 0  # the threshold actually separates boxes


def test_no_detection_passes_through_every_later_stage(
    models_dir: str, detector: Detector, inpainter: Inpainter, tmp_path: Path
) -> None:
    img_dir = tmp_path / "in"
    none_path = _save_png(img_dir / "none.png", _scene(64, 96, 3))
    some_path = _save_png(img_dir / "some.png", _scene(64, 96, 4))
    nothing = Detector(DetectSpec(queries=QUERIES, threshold=1.0), CPU, models_dir)(_read([none_path]))
    assert nothing["status"] == ["no_detection"]
    assert nothing["boxes"][0].shape == (0, 4) and nothing["boxes"][0].dtype == np.float32
    assert nothing["det_scores"][0].shape == (0,) and nothing["labels"][0] == []
    some = detector(_read([some_path]))
    assert some["status"] == [""]

    b = _concat(nothing, some)
    before = _row_snapshot(b, 0)
    b = Segmenter(SegmentSpec(), CPU, models_dir)(b)
    _assert_row_unchanged(before, b, 0)
    assert b["masks"][0].size == 0 and b["masks"][1].shape[1:] == (64, 96)
    b = MaskOps(MaskSpec(min_area=1))(b)
    _assert_row_unchanged(before, b, 0)
    assert b["mask"][0].size == 0 and b["blend"][0].size == 0 and b["mask"][1].shape == (64, 96)
    b = inpainter(b)
    _assert_row_unchanged(before, b, 0)
    assert b["edited"][0].size == 0 and b["crop"][0] == []
    assert b["edited"][1].shape == (64, 96, 3)
    out = Writer(str(tmp_path / "out"))(b)
    assert out["status"] == ["no_detection", "edited"]
    assert out["output_path"][0] == "" and out["mask_path"][0] == ""
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [f"{b['id'][1]}.png"]


# ----------------------------------------------------------------------------------------------- Segmenter


def _seg_rows() -> dict[str, list]:
    """Two non-square images of different sizes, with 3 and 1 boxes (the processor needs padding)."""
    b = _rows([_noise(48, 80, 10), _noise(70, 30, 11)], ["wide", "tall"])
    b["boxes"] = [
        np.array([[5, 5, 40, 30], [50.5, 10.2, 78, 45.7], [0, 0, 80, 48]], np.float32),
        np.array([[2, 10, 25, 60]], np.float32),
    ]
    b["det_scores"] = [np.array([0.9, 0.8, 0.7], np.float32), np.array([0.6], np.float32)]
    return b


def _one(batch: dict[str, list], i: int) -> dict[str, list]:
    return {k: [v[i]] for k, v in batch.items()}


@pytest.mark.parametrize("multimask", ["best", "largest", "single"])
def test_segmenter_masks_at_original_size_and_batch_independent(models_dir: str, multimask: str) -> None:
    seg = Segmenter(SegmentSpec(multimask=multimask, clip_to_box=True), CPU, models_dir)
    b = seg(_seg_rows())
    assert b["status"] == ["", ""]
    for i, (n, h, w) in enumerate([(3, 48, 80), (1, 70, 30)]):
        m = b["masks"][i]
        assert m.dtype == np.bool_ and m.shape == (n, h, w)
        assert b["mask_scores"][i].dtype == np.float32 and b["mask_scores"][i].shape == (n,)
        assert m.reshape(n, -1).any(1).all()  # no empty instance on these prompts
        # clip_to_box: nothing outside the prompting box
        assert not (m & ~box_masks(b["boxes"][i], h, w)).any()
    # Padding the box lists must not leak between images: each image alone gives the same masks.
    for i in range(2):
        alone = seg(_one(_seg_rows(), i))
        assert np.array_equal(alone["masks"][0], b["masks"][i])
        np.testing.assert_allclose(alone["mask_scores"][0], b["mask_scores"][i], atol=1e-5)


def test_segmenter_clip_to_box_is_the_unclipped_mask_and_box(models_dir: str) -> None:
    clipped = Segmenter(SegmentSpec(clip_to_box=True), CPU, models_dir)(_seg_rows())
    free = Segmenter(SegmentSpec(clip_to_box=False), CPU, models_dir)(_seg_rows())
    leaked = 0
    for i in range(2):
        box = box_masks(free["boxes"][i], *free["masks"][i].shape[1:])
        assert np.array_equal(clipped["masks"][i], free["masks"][i] & box)
        leaked += int((free["masks"][i] & ~box).sum())
    assert leaked > 0  # the random SAM does leak, so the clipping is really exercised


def test_segmenter_largest_is_at_least_best(models_dir: str) -> None:
    # Without clipping, ``largest`` picks the biggest of the same 3 candidates ``best`` chooses among.
    best = Segmenter(SegmentSpec(multimask="best", clip_to_box=False), CPU, models_dir)(_seg_rows())
    largest = Segmenter(SegmentSpec(multimask="largest", clip_to_box=False), CPU, models_dir)(_seg_rows())
    strictly = False
    for i in range(2):
        a_best = best["masks"][i].reshape(len(best["masks"][i]), -1).sum(1)
        a_largest = largest["masks"][i].reshape(len(largest["masks"][i]), -1).sum(1)
        assert np.all(a_largest >= a_best), (a_largest, a_best)
        strictly |= bool(np.any(a_largest > a_best))
    assert strictly  # the two policies differ on at least one instance here


def test_segmenter_skips_inactive_rows_and_rows_without_boxes(models_dir: str) -> None:
    b = _seg_rows()
    b["boxes"][1] = np.zeros((0, 4), np.float32)
    failed = _rows([_noise(10, 10, 5)], ["failed"])
    failed["boxes"], failed["det_scores"] = [np.zeros((0, 4), np.float32)], [np.zeros(0, np.float32)]
    b = _concat(b, failed)
    b["status"][2] = "error"
    b["error_stage"][2] = "detect"
    snapshot = _row_snapshot(b, 2)
    b = Segmenter(SegmentSpec(), CPU, models_dir)(b)
    assert b["masks"][0].shape == (3, 48, 80)
    assert b["masks"][1].size == 0 and b["status"][1] == ""
    _assert_row_unchanged(snapshot, b, 2)
    assert b["masks"][2].size == 0


# ------------------------------------------------------------------------------------------------- MaskOps


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _ring(h: int, w: int, cy: float, cx: float, r_out: float, r_in: float) -> np.ndarray:
    return _disc(h, w, cy, cx, r_out) & ~_disc(h, w, cy, cx, r_in)


@pytest.mark.parametrize(("dilate_px", "feather_px"), [(0, 0), (0, 3), (2, 0), (3, 4), (5, 1)])
def test_dilate_and_feather_bounded_support(dilate_px: int, feather_px: int) -> None:
    mask = _disc(60, 70, 25, 30, 6) | _disc(60, 70, 40, 50, 3)
    dilated, blend = dilate_and_feather(mask, dilate_px, feather_px)
    assert dilated.dtype == np.bool_ and dilated.shape == mask.shape
    assert blend.dtype == np.float32 and blend.shape == mask.shape
    dist = ndimage.distance_transform_edt(~mask)  # Euclidean distance to the mask, whole image
    assert not (mask & ~dilated).any()  # dilated contains the original
    assert np.array_equal(dilated, dist <= dilate_px)
    assert np.all(blend[dilated] == 1.0)
    assert blend.min() >= 0.0 and blend.max() <= 1.0
    assert np.all(blend[dist > dilate_px + feather_px + 1] == 0.0)  # bounded support
    assert np.all(blend[~dilated] < 1.0)
    if feather_px == 0:
        # no feather -> a hard mask: blend is exactly the dilated mask
        assert set(np.unique(blend).tolist()) <= {0.0, 1.0}
        assert np.array_equal(blend == 1.0, dilated)
    else:
        # a feather ramps down monotonically with distance and has intermediate values
        assert np.any((blend > 0) & (blend < 1))
        ring = (dist > dilate_px) & (dist <= dilate_px + feather_px)
        assert np.all(blend[ring] > 0)
        order = np.argsort(dist[ring], kind="stable")
        assert np.all(np.diff(blend[ring][order]) <= 1e-6)


def test_dilation_grows_area_monotonically() -> None:
    mask = _disc(80, 80, 40, 40, 5)
    areas = [int(dilate_and_feather(mask, d, 2)[0].sum()) for d in (0, 1, 2, 4, 8, 16)]
    assert areas[0] == int(mask.sum())
    assert all(a < b for a, b in zip(areas, areas[1:], strict=False)), areas


def test_dilate_and_feather_empty_mask_and_image_border() -> None:
    dilated, blend = dilate_and_feather(np.zeros((8, 9), bool), 3, 3)
    assert not dilated.any() and not blend.any() and blend.dtype == np.float32
    corner = np.zeros((30, 40), bool)
    corner[0:2, 0:3] = True  # near the border: the working window gets clipped to the image
    dilated, blend = dilate_and_feather(corner, 4, 4)
    dist = ndimage.distance_transform_edt(~corner)
    assert np.array_equal(dilated, dist <= 4)
    assert np.all(blend[dist > 9] == 0.0) and np.all(blend[dilated] == 1.0)


def test_select_instances_policies_and_min_area() -> None:
    masks = np.zeros((4, 20, 20), bool)
    masks[0, :5, :5] = True  # 25 px
    masks[1, :10, :10] = True  # 100 px
    masks[2, :2, :2] = True  # 4 px
    masks[3, 10:16, 10:16] = True  # 36 px
    scores = np.array([0.9, 0.5, 0.99, 0.7], np.float32)
    assert select_instances(masks, scores, MaskSpec(instances="all", min_area=0)).tolist() == [0, 1, 2, 3]
    assert select_instances(masks, scores, MaskSpec(instances="all", min_area=25)).tolist() == [0, 1, 3]
    assert select_instances(masks, scores, MaskSpec(instances="largest", min_area=0)).tolist() == [1]
    assert select_instances(masks, scores, MaskSpec(instances="top1", min_area=0)).tolist() == [2]
    # min_area applies before the policy: the 4 px top scorer is gone, next best score wins
    assert select_instances(masks, scores, MaskSpec(instances="top1", min_area=5)).tolist() == [0]
    assert select_instances(masks, scores, MaskSpec(instances="largest", min_area=101)).tolist() == []
    # an empty instance never counts, even with min_area=0
    empty = np.zeros((2, 5, 5), bool)
    assert select_instances(empty, np.ones(2, np.float32), MaskSpec(min_area=0)).tolist() == []


def _mask_rows(instances: list[np.ndarray], scores: list[np.ndarray]) -> dict[str, list]:
    b = new_rows([f"m{i}" for i in range(len(instances))], [""] * len(instances))
    b["masks"] = [m.copy() for m in instances]
    b["det_scores"] = [s.copy() for s in scores]
    return b


def test_maskops_union_fill_invert_and_min_area() -> None:
    h, w = 40, 50
    ring = _ring(h, w, 20, 20, 10, 5)
    blob = np.zeros((h, w), bool)
    blob[2:8, 38:46] = True
    tiny = np.zeros((h, w), bool)
    tiny[35, 45] = True
    inst = np.stack([ring, blob])
    filled = ndimage.binary_fill_holes(ring) | blob
    assert (filled & ~ring & ~blob).any()  # the ring has a hole to fill

    spec = dict(dilate_px=0, feather_px=0, min_area=4)
    rows = _mask_rows([inst, inst, inst, np.stack([tiny])], [np.array([0.6, 0.7], np.float32)] * 3 + [np.ones(1)])
    plain = MaskOps(MaskSpec(**spec, fill_holes=False))(copy.deepcopy(rows))
    fill = MaskOps(MaskSpec(**spec, fill_holes=True))(copy.deepcopy(rows))
    inv = MaskOps(MaskSpec(**spec, fill_holes=True, invert=True))(copy.deepcopy(rows))

    assert np.array_equal(plain["mask"][0], ring | blob)  # union of the instances, hole kept
    assert np.array_equal(fill["mask"][0], filled)  # hole filled
    assert np.array_equal(inv["mask"][0], ~filled)  # complement of the filled union, exactly
    for out, expected in ((plain, ring | blob), (fill, filled), (inv, ~filled)):
        assert out["status"][:3] == ["", "", ""]
        assert out["mask"][0].dtype == np.bool_ and out["blend"][0].dtype == np.float32
        assert np.array_equal(out["blend"][0], expected.astype(np.float32))  # no dilation, no feather
        assert out["mask_area"][0] == int(expected.sum()) and out["instances"][0] == 2
        assert out["masks"][0].size == 0  # instance masks are dropped once merged
        # every instance below min_area -> no_detection, nothing produced
        assert out["status"][3] == "no_detection" and "min_area" in out["error_message"][3]
        assert out["mask"][3].size == 0 and out["blend"][3].size == 0 and out["mask_area"][3] == 0


def test_maskops_policy_and_dilation_in_stage() -> None:
    h, w = 40, 50
    a = np.zeros((h, w), bool)
    a[5:10, 5:10] = True  # 25 px, best score
    big = np.zeros((h, w), bool)
    big[20:35, 20:40] = True  # 300 px
    rows = _mask_rows([np.stack([a, big])] * 2, [np.array([0.9, 0.2], np.float32)] * 2)
    rows["status"][1] = "error"  # inactive: untouched
    snapshot = _row_snapshot(rows, 1)
    out = MaskOps(MaskSpec(instances="top1", dilate_px=3, feather_px=2, min_area=1))(rows)
    dist = ndimage.distance_transform_edt(~a)
    assert np.array_equal(out["mask"][0], dist <= 3)
    assert out["instances"][0] == 1 and out["mask_area"][0] == int((dist <= 3).sum())
    assert not out["blend"][0][big].any()  # the other instance is not edited
    _assert_row_unchanged(snapshot, out, 1)
    assert out["mask"][1].size == 0


def test_maskops_invert_of_full_mask_is_no_detection() -> None:
    full = np.ones((1, 6, 7), bool)
    out = MaskOps(MaskSpec(invert=True, min_area=1, dilate_px=0, feather_px=0))(_mask_rows([full], [np.ones(1)]))
    assert out["status"] == ["no_detection"] and "invert" in out["error_message"][0]


# ----------------------------------------------------------------------------------------------- Inpainter


def _support(blend: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(blend)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@pytest.mark.parametrize(
    ("shape", "rect", "padding", "resolution"),
    [
        ((200, 300), (90, 110, 140, 160), 0.25, 512),  # small object in the middle
        ((200, 300), (0, 10, 0, 12), 0.5, 64),  # in a corner: the window is pushed inside
        ((120, 90), (10, 110, 40, 50), 0.25, 512),  # tall thin object on a tall image
        ((64, 96), (20, 36, 30, 50), 0.0, 64),
    ],
)
def test_plan_crop_covers_support_and_stays_inside(shape, rect, padding, resolution) -> None:
    _, blend = _rect_blend(*shape, *rect)
    c = plan_crop(blend, padding, resolution)
    h, w = shape
    by0, by1, bx0, bx1 = _support(blend)
    assert 0 <= c.y0 <= by0 and by1 <= c.y1 <= h
    assert 0 <= c.x0 <= bx0 and bx1 <= c.x1 <= w
    assert c.model_h % 8 == 0 and c.model_w % 8 == 0 and c.model_h >= 8 and c.model_w >= 8
    # every blend weight lies in the window
    inside = np.zeros_like(blend, bool)
    inside[c.y0 : c.y1, c.x0 : c.x1] = True
    assert not blend[~inside].any()
    # model size: the crop's aspect snapped to a bucket, about resolution^2 pixels
    assert abs(np.log((c.model_w / c.model_h) / ((c.x1 - c.x0) / (c.y1 - c.y0)))) <= np.log(1.5) + 0.1
    assert 0.8 <= c.model_h * c.model_w / resolution**2 <= 1.2


def test_plan_crop_is_square_when_room_and_padded() -> None:
    _, blend = _rect_blend(200, 300, 90, 110, 140, 160, dilate=0, feather=0)  # 20x20 support
    c = plan_crop(blend, 0.25, 512)
    assert (c.y1 - c.y0) == (c.x1 - c.x0) == 30  # 20 * (1 + 2 * 0.25)
    assert (c.model_h, c.model_w) == (512, 512)
    # centred on the support
    assert (c.y0 + c.y1) // 2 == 100 and (c.x0 + c.x1) // 2 == 150


def test_plan_crop_wide_strip_uses_wide_bucket() -> None:
    _, blend = _rect_blend(100, 400, 48, 52, 40, 360, dilate=0, feather=0)  # 4 x 320 strip
    c = plan_crop(blend, 0.25, 512)
    assert (c.y0, c.y1, c.x0, c.x1) == (0, 100, 0, 400)  # the padded square is clipped to the image
    assert c.model_w > c.model_h
    assert c.model_w / c.model_h == pytest.approx(max(ASPECT_BUCKETS), rel=0.05)  # 4:1 crop -> widest bucket
    assert (c.model_h, c.model_w) == (360, 728)  # 512 * sqrt(2) = 724 -> 728, 512 / sqrt(2) = 362 -> 360
    tall = plan_crop(blend.T.copy(), 0.25, 512)  # and the transpose picks the tallest bucket
    assert (tall.model_h, tall.model_w) == (728, 360)
    # SD's UNet downsamples 3 times after the VAE's 8: sizes in multiples of 64 keep every level whole.
    c64 = plan_crop(blend, 0.25, 512, multiple=64)
    assert (c64.model_h, c64.model_w) == (384, 704)  # 362 -> 384, 724 -> 704


def test_pipeline_size_multiple_follows_the_unet(tiny_models: Path) -> None:
    from types import SimpleNamespace

    from promptpaint.models import LoadedModel, get_entry, pipeline_size_multiple

    inp = Inpainter(InpaintSpec(steps=1), CPU, str(tiny_models))
    assert pipeline_size_multiple(inp.loaded) == inp.multiple == 8  # tiny: VAE 2 x 2^1 = 4, raised to 8

    def real(name: str, blocks: tuple[int, ...]) -> LoadedModel:
        # The real checkpoints' numbers (VAE scale 8; UNet block_out_channels), without building 2 GB of UNet.
        pipe = SimpleNamespace(
            vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=blocks))
        )
        return LoadedModel(get_entry(name), "x", None, None, pipe)

    assert pipeline_size_multiple(real("sd15-inpaint", (320, 640, 1280, 1280))) == 64
    assert pipeline_size_multiple(real("sdxl-inpaint", (320, 640, 1280))) == 32


def test_paste_keeps_untouched_pixels_bit_exact() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    crop = Crop(5, 35, 10, 50, 64, 64)
    generated = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    blend = np.zeros((40, 60), np.float32)
    blend[10:20, 15:30] = 1.0
    blend[20:30, 15:45] = rng.random((10, 30)).astype(np.float32)
    before = image.copy()
    out = paste(image, generated, blend, crop)
    assert np.array_equal(image, before)  # input not modified
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[blend == 0], image[blend == 0])
    full = np.zeros_like(blend, bool)
    full[10:20, 15:30] = True
    gen_full = np.zeros_like(image)
    gen_full[5:35, 10:50] = generated
    assert np.array_equal(out[full], gen_full[full])  # blend == 1 -> the generated pixel exactly
    a = blend[20:30, 15:45, None]
    mixed = np.rint(a * gen_full[20:30, 15:45] + (1 - a) * image[20:30, 15:45].astype(np.float32))
    assert np.array_equal(out[20:30, 15:45], mixed.astype(np.uint8))


def _inpaint_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dilated, blend = _rect_blend(64, 96, 20, 36, 30, 50, dilate=2, feather=3)
    return _scene(64, 96, seed), dilated, blend


def test_inpainter_edits_only_the_masked_region(inpainter: Inpainter) -> None:
    image, dilated, blend = _inpaint_case()
    assert (blend == 0).sum() > 0.5 * blend.size
    b = inpainter(_rows([image], ["img-a"], [blend]))
    assert b["status"] == [""]
    edited = b["edited"][0]
    assert edited.shape == image.shape and edited.dtype == np.uint8
    untouched = blend == 0
    assert np.array_equal(edited[untouched], image[untouched])  # bit-identical outside the support
    changed = np.any(edited != image, axis=2)
    assert changed[dilated].mean() > 0.5  # the model really repainted the masked pixels
    assert not changed[untouched].any()
    y0, y1, x0, x1 = b["crop"][0]
    sy0, sy1, sx0, sx1 = _support(blend)
    assert 0 <= y0 <= sy0 and sy1 <= y1 <= 64 and 0 <= x0 <= sx0 and sx1 <= x1 <= 96
    assert b["seed"][0] == derive_seed(0, "img-a")
    assert b["t_inpaint_ms"][0] > 0
    # the input image column itself is not modified in place
    assert np.array_equal(b["image"][0], image)


def test_inpainter_is_deterministic(models_dir: str, inpainter: Inpainter) -> None:
    image, _, blend = _inpaint_case()
    first = inpainter(_rows([image], ["img-a"], [blend]))["edited"][0]
    again = inpainter(_rows([image], ["img-a"], [blend]))["edited"][0]
    assert first.tobytes() == again.tobytes()
    fresh = Inpainter(InpaintSpec(steps=2, seed=0), CPU, models_dir)
    assert fresh(_rows([image], ["img-a"], [blend]))["edited"][0].tobytes() == first.tobytes()
    other = Inpainter(InpaintSpec(steps=2, seed=1), CPU, models_dir)(_rows([image], ["img-a"], [blend]))
    assert other["seed"][0] == derive_seed(1, "img-a") != derive_seed(0, "img-a")
    assert not np.array_equal(other["edited"][0], first)
    untouched = blend == 0
    assert np.array_equal(other["edited"][0][untouched], image[untouched])
    # same pixels, another id -> another per-image seed -> another result
    renamed = inpainter(_rows([image], ["img-b"], [blend]))["edited"][0]
    assert not np.array_equal(renamed, first)


def test_inpainter_result_does_not_depend_on_batch_position(inpainter: Inpainter) -> None:
    image_a, _, blend = _inpaint_case(0)
    image_b = _scene(64, 96, 7)
    alone = inpainter(_rows([image_a], ["A"], [blend]))
    batched = inpainter(_rows([image_b, image_a], ["B", "A"], [blend, blend]))  # same model size: one call
    assert alone["seed"][0] == batched["seed"][1] == derive_seed(0, "A")
    assert batched["seed"][0] == derive_seed(0, "B")
    # Batched CPU matmuls may differ from unbatched ones in the last bit, which can move a rounded
    # uint8 pixel by one or two levels; the per-image generator makes everything else identical.
    diff = alone["edited"][0].astype(np.int16) - batched["edited"][1].astype(np.int16)
    assert np.abs(diff).max() <= 2
    assert not np.array_equal(batched["edited"][0][blend > 0], batched["edited"][1][blend > 0])


def test_inpainter_passes_inactive_rows_through(inpainter: Inpainter) -> None:
    image, _, blend = _inpaint_case()
    b = _rows([image, image], ["skip", "go"], [np.zeros((0, 0), np.float32), blend])
    b["status"][0] = "no_detection"
    snapshot = _row_snapshot(b, 0)
    b = inpainter(b)
    _assert_row_unchanged(snapshot, b, 0)
    assert b["edited"][0].shape == (0, 0, 3) and b["edited"][0].dtype == np.uint8 and b["crop"][0] == []
    assert b["status"][1] == "" and b["edited"][1].shape == (64, 96, 3)


def test_inpainter_remove_mode_prompts(models_dir: str) -> None:
    spec = InpaintSpec(steps=1, negative_prompt="blurry")
    remove = Inpainter(spec, CPU, models_dir, mode="remove", queries=["car", "dog"])
    assert remove.prompts() == (spec.remove_prompt, "blurry, car, dog")
    assert Inpainter(spec, CPU, models_dir).prompts() == (spec.prompt, "blurry")
    assert remove.resolution == 64  # tiny SD: sample_size 8 x VAE factor 8


# -------------------------------------------------------------------------------------------------- Writer


def _edit_files(inpainter: Inpainter, paths: list[Path], rect=(10, 30, 12, 40)) -> dict[str, list]:
    b = _read(paths)
    b["blend"] = [_rect_blend(*im.shape[:2], *rect)[1] for im in b["image"]]
    return inpainter(b)


def test_writer_writes_pngs_with_text_and_truthful_masks(inpainter: Inpainter, tmp_path: Path) -> None:
    src = _save_png(tmp_path / "in" / "rgb.png", _scene(48, 64, 1))
    b = _edit_files(inpainter, [src])
    original = b["image"][0].copy()
    out_dir = tmp_path / "out"
    out = Writer(str(out_dir), {"promptpaint:spec_hash": SPEC_HASH})(b)
    row_id = b["id"][0]
    img_path, msk_path = out_dir / "images" / f"{row_id}.png", out_dir / "masks" / f"{row_id}.png"
    assert out["status"] == ["edited"]
    assert out["output_path"] == [str(img_path)] and out["mask_path"] == [str(msk_path)]
    assert sorted(p.name for p in out_dir.rglob("*") if p.is_file()) == [f"{row_id}.png"] * 2  # no temp files

    text = read_png_text(img_path.read_bytes())
    assert text["promptpaint:id"] == row_id
    assert text["promptpaint:seed"] == str(derive_seed(0, row_id)) == str(out["seed"][0])
    assert text["promptpaint:spec_hash"] == SPEC_HASH
    # No input path: identical inputs under two paths share this file, so it must not depend on which wrote last.
    assert "promptpaint:input_path" not in text
    same_bytes_other_path = {**copy.deepcopy(b), "path": ["elsewhere/copy.png"], "status": [""]}
    before = img_path.read_bytes()
    img_path.unlink()
    again = Writer(str(out_dir), {"promptpaint:spec_hash": SPEC_HASH})(same_bytes_other_path)
    assert again["status"] == ["edited"] and img_path.read_bytes() == before

    written = _decode_png(str(img_path))
    mask = _decode_png(str(msk_path))
    assert written.shape == (48, 64, 3) and written.dtype == np.uint8  # RGB input -> RGB output
    assert np.array_equal(written, b["edited"][0])
    assert mask.shape == (48, 64) and mask.dtype == np.uint8
    assert np.array_equal(mask, blend_to_mask_png(b["blend"][0]))
    assert np.array_equal(mask > 0, b["blend"][0] > 0)
    changed = np.any(written != original, axis=2)
    assert changed.any()
    assert not changed[mask == 0].any()  # mask == 0 => pixel identical to the input


def test_blend_to_mask_png_rounds_up() -> None:
    blend = np.array([[0.0, 1e-6, 0.5 / 255, 0.25], [0.5, 254.5 / 255, 1.0, 0.0]], np.float32)
    mask = blend_to_mask_png(blend)
    assert mask.dtype == np.uint8
    # any weight > 0 -> non-zero, so mask == 0 really means "copied from the input"
    assert mask.tolist() == [[0, 1, 1, 64], [128, 255, 255, 0]]


def test_writer_restores_alpha(inpainter: Inpainter, tmp_path: Path) -> None:
    rgb = _scene(48, 64, 2)
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    alpha[:5] = 0
    src = tmp_path / "in" / "rgba.png"
    src.parent.mkdir()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    b = _edit_files(inpainter, [src])
    assert np.array_equal(b["alpha"][0], alpha)
    Writer(str(tmp_path / "out"))(b)
    with Image.open(tmp_path / "out" / "images" / f"{b['id'][0]}.png") as im:
        assert im.mode == "RGBA"
        px = np.asarray(im).copy()
    assert np.array_equal(px[..., 3], alpha)
    assert np.array_equal(px[..., :3], b["edited"][0])
    untouched = b["blend"][0] == 0
    assert np.array_equal(px[..., :3][untouched], rgb[untouched])


def test_writer_returns_only_manifest_columns(inpainter: Inpainter, tmp_path: Path) -> None:
    b = _edit_files(inpainter, [_save_png(tmp_path / "x.png", _scene(48, 64, 3))])
    b["boxes"] = [np.array([[1.5, 2.0, 30.0, 40.0]], np.float32)]
    b["labels"] = [["car"]]
    out = Writer(str(tmp_path / "out"))(b)
    assert set(out) == set(MANIFEST_COLUMNS) | {f"t_{s}_ms" for s in TIMING_STAGES}
    for col, values in out.items():
        assert len(values) == 1
        assert all(isinstance(v, str | int | float) for v in values), col
    assert json.loads(out["boxes"][0]) == [[1.5, 2.0, 30.0, 40.0]]
    assert json.loads(out["labels"][0]) == ["car"]
    assert json.loads(out["crop"][0]) == list(b["crop"][0])
    assert json.loads(out["mask_scores"][0]) == []  # a column no stage produced gets its default
    assert out["width"] == [64] and out["height"] == [48]
    assert out["t_write_ms"][0] > 0 and out["t_detect_ms"] == [0.0]


# --------------------------------------------------------------------------------------------------- Chain


def test_chain_all_stages_bad_file_does_not_stop_others(tiny_models: Path, sample_files: list[Path], tmp_path: Path):
    spec = EditSpec(
        input=str(sample_files[0].parent.parent),
        output=str(tmp_path / "out"),
        models_dir=str(tiny_models),
        detect={"queries": QUERIES, "threshold": THRESHOLD},
        mask={"min_area": 16},
        inpaint={"steps": 2},
        runtime={"executor": "local", "device": "cpu"},
    )
    chain = Chain(spec, spec.stages())
    paths = [str(p) for p in sample_files]
    out = chain({"path": paths})
    assert out["path"] == paths
    names = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
    status = dict(zip(names, out["status"], strict=True))
    kinds = dict(zip(names, out["error_kind"], strict=True))
    good = [n for n in status if "/sample_" in n]
    assert len(good) == 4 and all(status[n] == "edited" for n in good)
    assert {n: kinds[n] for n in status if "/broken_" in n} == {
        "b/broken_truncated.jpg": "truncated",
        "b/broken_empty.png": "empty",
        "b/broken_text.jpg": "undecodable",
    }
    assert all(status[n] == "error" for n in status if "/broken_" in n)
    for i, p in enumerate(paths):
        written = Path(out["output_path"][i]) if out["output_path"][i] else None
        if Path(p).name.startswith("sample_"):
            assert written is not None and written.is_file() and Path(out["mask_path"][i]).is_file()
            assert read_png_text(written.read_bytes())["promptpaint:id"] == out["id"][i]
            assert out["id"][i] == content_id(Path(p).read_bytes(), spec.spec_hash())
        else:
            assert written is None and out["error_stage"][i] == "read"
    assert len(list((tmp_path / "out" / "images").iterdir())) == 4
    # Stages carry no run-level columns: the driver adds model lineage to manifest rows (test_hardening).
    assert "models" not in out
    assert not any(isinstance(v, np.ndarray) for col in out.values() for v in col)


def test_to_numpy_batch_handles_ragged_list_columns():
    """Rows with different numbers of detections must survive the hop between Ray stages."""
    from promptpaint.actors.common import as_lists, to_numpy_batch

    batch = {
        "id": ["a", "b", "c"],
        "labels": [[], ["car"], ["car", "dog"]],
        "crop": [[], [0, 4, 0, 4], [1, 5, 1, 5]],
        "boxes": [np.zeros((0, 4), np.float32), np.ones((1, 4), np.float32), np.ones((2, 4), np.float32)],
        "same": [np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))],
    }
    out = to_numpy_batch(batch)
    assert all(col.shape == (3,) for col in out.values())
    back = as_lists(out)
    assert [list(x) for x in back["labels"]] == batch["labels"]
    assert [list(x) for x in back["crop"]] == batch["crop"]
    assert [b.shape for b in back["boxes"]] == [(0, 4), (1, 4), (2, 4)]


def test_a_stage_given_the_wrong_kind_of_model_says_so(tiny_models):
    from promptpaint.actors.detector import Detector
    from promptpaint.actors.segmenter import Segmenter
    from promptpaint.config import DetectSpec, SegmentSpec

    with pytest.raises(ValueError, match=r"detect\.model='sam' is a segment model; pick a detect model"):
        Detector(DetectSpec(model="sam"), RuntimeSpec(), str(tiny_models))
    with pytest.raises(ValueError, match=r"segment\.model='owlv2' is a detect model"):
        Segmenter(SegmentSpec(model="owlv2"), RuntimeSpec(), str(tiny_models))
