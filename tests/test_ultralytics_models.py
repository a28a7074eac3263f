"""Ultralytics families: YOLO-World (detect), MobileSAM and FastSAM (segment).

Each tiny model is built by ``build_tiny`` from ultralytics' own configs, saved as an ultralytics checkpoint,
loaded by ``load_model`` through the loader real assets take, and run through the Detector / Segmenter stage.
Random YOLO heads find nothing meaningful, so these tests check the plumbing: shapes and dtypes, boxes and masks
in the original (non-square) image frame, one candidate row per instance prompt, thresholds, the channel order the
network sees, YOLO-World's class features coming from our CLIP text tower, and the prompts ultralytics' predictors
receive (spied on, never replaced). ``real_weights`` tests run only where the real assets are available.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from promptpaint.actors.common import new_rows
from promptpaint.actors.detector import Detector
from promptpaint.actors.prompts import InstancePrompt
from promptpaint.actors.segmenter import Segmenter, box_masks
from promptpaint.config import DetectSpec, RuntimeSpec, SegmentSpec
from promptpaint.models import (
    MODELS,
    ModelNotAvailable,
    is_available,
    load_model,
    source_label,
    ultralytics_asset_path,
)
from promptpaint.tiny import TINY_ULTRALYTICS_IMGSZ, build_tiny

CPU = RuntimeSpec(device="cpu", dtype="float32")
OMP_AT_IMPORT = os.environ.get("OMP_NUM_THREADS")  # before anything here imported ultralytics
NAMES = ["yolo-world", "mobile-sam", "fastsam"]
QUERIES = ["car", "dog"]
# Non-square, larger than the tiny predict size (128) on both axes: letterbox-frame boxes could not reach past 128.
WIDE = (144, 200)
TALL = (120, 80)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-ultralytics")
    build_tiny(folder, NAMES)
    return folder


@pytest.fixture(scope="module")
def detector(tiny: Path) -> Detector:
    return Detector(DetectSpec(model="yolo-world", queries=QUERIES, threshold=0.0, top_k=10), CPU, str(tiny))


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _red(h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 255
    return img


def _rows(images: list[np.ndarray]) -> dict[str, list]:
    b = new_rows([f"id{k}" for k in range(len(images))], [f"mem/{k}.png" for k in range(len(images))])
    b["image"] = [im.copy() for im in images]
    return b


def _spy(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[tuple[tuple, dict, Any]]:
    """Record (args, kwargs, result) of every call of ``obj.name``; the real method still runs."""
    calls: list[tuple[tuple, dict, Any]] = []
    real = getattr(obj, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(obj, name, spy)
    return calls


# ------------------------------------------------------------------------------------------- registry


def test_entries_load_locally_and_say_where_real_weights_come_from(tiny: Path, tmp_path: Path) -> None:
    for name in NAMES:
        entry = MODELS[name]
        label = source_label(entry)
        assert entry.asset in label and entry.asset_release in label and entry.hub_id in label
        assert is_available(name, str(tiny))
        if ultralytics_asset_path(entry.asset) is None:
            assert not is_available(name, str(tmp_path))  # no folder, no asset in cwd / weights dir
        lm = load_model(name, str(tiny), torch.device("cpu"), torch.float32, task=entry.task)
        assert lm.revision == "local" and lm.processor.imgsz == TINY_ULTRALYTICS_IMGSZ
        assert Path(lm.processor.weights).parent == tiny / name
    assert "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268" in source_label(MODELS["yolo-world"])


def test_load_and_predict_never_reach_for_the_network(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    out = Detector(DetectSpec(model="yolo-world", queries=["cat"]), CPU, str(tiny))(_rows([_noise(*TALL, 6)]))
    assert out["status"] == [""]
    for name in ("mobile-sam", "fastsam"):
        out = Segmenter(SegmentSpec(model=name), CPU, str(tiny))(_prompted_rows([_noise(*WIDE, 7), _noise(*TALL, 8)]))
        assert out["status"] == ["", ""], out["error_message"]
    assert attempts == []


def test_models_list_shows_assets_pins_and_availability(tiny: Path) -> None:
    from typer.testing import CliRunner

    from promptpaint.cli import app

    res = CliRunner().invoke(app, ["models", "list", "--models-dir", str(tiny)])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines()[1:]}
    for name in NAMES:
        entry = MODELS[name]
        assert " yes " in lines[name] and entry.asset in lines[name] and entry.asset_release in lines[name]
    assert "openai/clip-vit-base-patch32 @ 3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268" in lines["yolo-world"]


def test_tiny_build_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    build_tiny(tmp_path, NAMES)
    for name, rel in (("yolo-world", "model.pt"), ("mobile-sam", "mobile_sam.pt"), ("fastsam", "model.pt")):
        a, b = torch.load(tiny / name / rel, weights_only=False), torch.load(tmp_path / name / rel, weights_only=False)
        sa = a["model"].state_dict() if "model" in a else a  # ultralytics checkpoint / SAM state dict
        sb = b["model"].state_dict() if "model" in b else b
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    text_a = load_file(tiny / "yolo-world" / "text_encoder" / "model.safetensors")
    text_b = load_file(tmp_path / "yolo-world" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)


def test_missing_asset_fails_at_once_offline(tmp_path: Path) -> None:
    from ultralytics.utils import ONLINE

    assert not ONLINE  # YOLO_OFFLINE=1 (conftest) before ultralytics was imported
    for name in NAMES:
        entry = MODELS[name]
        if is_available(name, None):
            continue  # the real asset is here; loading would succeed
        t0 = time.monotonic()
        with pytest.raises(ModelNotAvailable) as info:
            load_model(name, str(tmp_path), torch.device("cpu"), torch.float32)
        assert time.monotonic() - t0 < 5  # no download retries
        msg = str(info.value)
        for needle in (entry.asset, entry.asset_release, "YOLO_OFFLINE", "weights dir", "build-tiny"):
            assert needle in msg


def test_local_folder_must_hold_one_checkpoint(tiny: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny / "fastsam", tmp_path / "fastsam")
    shutil.copy(tiny / "fastsam" / "model.pt", tmp_path / "fastsam" / "other.pt")
    with pytest.raises(ModelNotAvailable, match="exactly one .pt checkpoint"):
        load_model("fastsam", str(tmp_path), torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------- YOLO-World


def test_yolo_world_class_features_come_from_our_text_encoder(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, parts = detector.backend, detector.loaded.processor
    world = detector.loaded.model.model  # ultralytics WorldModel
    # ultralytics' own text path (OpenAI `clip` package + download) must never run.
    monkeypatch.setattr(world, "get_text_pe", lambda *a, **k: pytest.fail("ultralytics built its CLIP model"))
    tokens = parts.tokenizer(QUERIES, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = parts.text_model(**tokens).text_embeds.float()
    expected = emb / emb.norm(dim=-1, keepdim=True)

    detector(_rows([_noise(*WIDE, 0)]))
    feats = world.txt_feats
    assert feats.shape == (1, 2, 512) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[0], expected)
    assert world.model[-1].nc == 2 and world.names == QUERIES
    assert backend.text_features(list(QUERIES)) is feats  # cached per query list

    backend.set_queries(["bicycle", *QUERIES])
    three = world.txt_feats
    assert three.shape == (1, 3, 512) and world.model[-1].nc == 3 and world.names == ["bicycle", *QUERIES]
    torch.testing.assert_close(three[0, 1:], feats[0], atol=1e-5, rtol=1e-5)  # per query, whatever the list
    assert not torch.allclose(three[0, 0], feats[0, 0])
    backend.set_queries(QUERIES)
    assert world.txt_feats is feats


def test_yolo_world_text_tower_loads_from_a_full_clip_checkpoint(tiny: Path, tmp_path: Path) -> None:
    """openai/clip-vit-base-patch32 is a whole CLIPModel; the loader must take its text tower + projection from it
    and give CLIP's own text features (what ultralytics' clip:ViT-B/32 encode_text computes), normalised."""
    from transformers import CLIPConfig, CLIPModel

    from promptpaint.models.tiny import tiny_text_config, tiny_tokenizer
    from promptpaint.models.yolo_world import YoloWorldBackend

    tok = tiny_tokenizer(77)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tiny_text_config(tok, 77), "eos_token_id": 2},  # the real config's legacy EOS id
        vision_config={**vision, "image_size": 32, "patch_size": 16},
        projection_dim=512,
    )
    clip = CLIPModel(config).eval()
    shutil.copytree(tiny / "yolo-world", tmp_path / "yolo-world", ignore=shutil.ignore_patterns("text_encoder"))
    clip.save_pretrained(tmp_path / "yolo-world" / "text_encoder")
    tok.save_pretrained(tmp_path / "yolo-world" / "text_encoder")

    loaded = load_model("yolo-world", str(tmp_path), torch.device("cpu"), torch.float32, task="detect")
    feats = YoloWorldBackend(loaded, torch.device("cpu"), torch.float32).text_features(["a red car", "dog"])
    with torch.no_grad():
        out = clip.get_text_features(**tok(["a red car", "dog"], padding=True, return_tensors="pt"))
    ref = out if torch.is_tensor(out) else out.pooler_output
    torch.testing.assert_close(feats[0], ref / ref.norm(dim=-1, keepdim=True))


def test_yolo_world_detects_in_the_original_frame_with_thresholds(detector: Detector, tiny: Path) -> None:
    images = [_noise(*WIDE, 1), _noise(*TALL, 2)]
    raw = detector.backend(images, QUERIES, 0.0)
    for (boxes, scores, query), im in zip(raw, images, strict=True):
        h, w = im.shape[:2]
        assert boxes.dtype == np.float32 and scores.dtype == np.float32 and query.dtype == np.int64
        assert boxes.shape == (len(scores), 4) and query.shape == scores.shape and len(scores) > 0
        assert set(query.tolist()) <= {0, 1}
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w).all()
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h).all()
    # The 144x200 image ran at 128 px: centres past 128 exist only once boxes are scaled back to the original.
    boxes = raw[0][0]
    assert ((boxes[:, 0] + boxes[:, 2]) / 2).max() > 170 and ((boxes[:, 1] + boxes[:, 3]) / 2).max() > 120

    # Thresholds: the backend keeps what ultralytics keeps at conf=threshold; the stage applies per-query ones.
    all_scores = np.concatenate([s for _, s, _ in raw])
    t_car, t_dog = np.quantile(all_scores, [0.5, 0.8])
    above = detector.backend(images, QUERIES, float(t_car))
    assert all((s > t_car).all() for _, s, _ in above)
    assert sum(len(s) for _, s, _ in above) < sum(len(s) for _, s, _ in raw)
    spec = DetectSpec(
        model="yolo-world",
        queries=[{"text": "car", "threshold": float(t_car)}, {"text": "dog", "threshold": float(t_dog)}],
        top_k=5,
    )
    out = Detector(spec, CPU, str(tiny))(_rows(images))
    assert out["status"] == ["", ""]
    for boxes, labels, scores in zip(out["boxes"], out["labels"], out["det_scores"], strict=True):
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4) and 0 < len(labels) <= 5
        assert set(labels) <= set(QUERIES) and scores.dtype == np.float32
        limit = np.array([t_car if lab == "car" else t_dog for lab in labels])
        assert (scores >= limit).all() and (np.diff(scores) <= 0).all()


def test_yolo_world_network_sees_rgb(detector: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    red = _red(*WIDE)
    detector.backend([red], QUERIES, 0.5)  # first call builds the predictor; the next one reuses it
    seen = _spy(monkeypatch, detector.backend.world.predictor, "preprocess")
    detector.backend([red], QUERIES, 0.5)
    (_, _, tensor), *_ = seen
    assert tensor.shape[:2] == (1, 3)
    r, b = tensor[0, 0], tensor[0, 2]  # RGB in [0, 1]; the letterbox pads with 114/255 grey
    assert (r == 1).any() and (b == 0).any() and not (b == 1).any() and not (r == 0).any()


def test_ultralytics_leaves_process_threads_alone(detector: Detector) -> None:
    from ultralytics.utils import NUM_THREADS

    assert os.environ.get("OMP_NUM_THREADS") == OMP_AT_IMPORT  # ultralytics sets it to 1 on import when unset
    before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS + 1)  # a count ultralytics' select_device would change
    try:
        detector.backend([_noise(*TALL, 5)], ["cat", "dog"], 0.5)  # new queries -> new predictor -> select_device
        assert torch.get_num_threads() == NUM_THREADS + 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- segmenters


def _prompted_rows(images: list[np.ndarray]) -> dict[str, list]:
    """Row 0: two box instances, each refined by one point (positive in box 0, negative in box 1).
    Row 1: no box, a positive and a negative point: one points-only instance."""
    b = _rows(images)
    b["boxes"] = [np.array([[8, 8, 90, 70], [90, 30, 190, 130]], np.float32), np.zeros((0, 4), np.float32)]
    b["prompt_points"] = [np.array([[30, 30], [150, 80]], np.float32), np.array([[40, 60], [20, 100]], np.float32)]
    b["prompt_labels"] = [np.array([1, 0], np.int64), np.array([1, 0], np.int64)]
    return b


def _check_masks(out: dict[str, list], images: list[np.ndarray]) -> None:
    assert out["status"] == ["", ""], out["error_message"]
    for masks, scores, im, n in zip(out["masks"], out["mask_scores"], images, (2, 1), strict=True):
        assert masks.dtype == bool and masks.shape == (n, *im.shape[:2])  # one mask per instance, original size
        assert scores.dtype == np.float32 and scores.shape == (n,)
    # clip_to_box: box instances stay inside their box
    boxes = out["boxes"][0]
    assert not (out["masks"][0] & ~box_masks(boxes, *images[0].shape[:2])).any()


def test_mobile_sam_prompts_reach_the_predictor(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = Segmenter(SegmentSpec(model="mobile-sam", multimask="best"), CPU, str(tiny))
    predictor = seg.backend.predictor
    prompts = _spy(monkeypatch, predictor, "inference")
    pixels = _spy(monkeypatch, predictor, "preprocess")
    images = [_red(*WIDE), _noise(*TALL, 3)]
    batch = _prompted_rows(images)
    out = seg(batch)
    _check_masks(out, images)

    # One decoder call per image (one prompt kind each), prompts in original pixels, negative labels kept.
    assert len(prompts) == 2
    kw0, kw1 = prompts[0][1], prompts[1][1]
    np.testing.assert_array_equal(kw0["bboxes"], batch["boxes"][0])
    np.testing.assert_array_equal(kw0["points"], [[[30, 30]], [[150, 80]]])
    np.testing.assert_array_equal(kw0["labels"], [[1], [0]])
    assert "bboxes" not in kw1 and kw1["points"].shape == (1, 2, 2)
    np.testing.assert_array_equal(kw1["labels"], [[1, 0]])
    assert kw0["multimask_output"] and kw1["multimask_output"]
    # ultralytics' SAM normalisation of a pure-red image: R = (255 - 123.675) / 58.395, B = (0 - 103.53) / 57.375
    first = pixels[0][2][0]
    assert first[0].max().item() == pytest.approx(2.2489, abs=1e-3)
    assert first[2].min().item() == pytest.approx(-1.8044, abs=1e-3)

    # Backend level: SAM's 3 candidates or 1; a negative label is a different prompt than a positive one.
    im = images[1]
    pos = InstancePrompt(None, np.array([[40, 60]], np.float32), np.array([1], np.int64))
    neg = InstancePrompt(None, np.array([[40, 60]], np.float32), np.array([0], np.int64))
    ((cand, scores),) = seg.backend([im], [[pos, neg]], multimask=True)
    assert cand.shape == (2, 3, *im.shape[:2]) and cand.dtype == bool
    assert scores.shape == (2, 3) and scores.dtype == np.float32
    assert not np.allclose(scores[0], scores[1])
    ((cand, scores),) = seg.backend([im], [[pos]], multimask=False)
    assert cand.shape == (1, 1, *im.shape[:2]) and scores.shape == (1, 1)


def test_fastsam_selects_among_everything_masks(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = Segmenter(SegmentSpec(model="fastsam", multimask="best", clip_to_box=False), CPU, str(tiny))
    images = [_red(*WIDE), _noise(*TALL, 4)]
    seg(_prompted_rows(images))  # first call builds ultralytics' predictor; the spied call reuses it
    predictor = seg.backend.fastsam.predictor
    prompts = _spy(monkeypatch, predictor, "prompt")
    pixels = _spy(monkeypatch, predictor, "preprocess")
    batch = _prompted_rows(images)
    out = seg(batch)
    assert out["status"] == ["", ""], out["error_message"]

    # ultralytics' prompt() once per instance, with that instance's own box / points / labels (its predictor also
    # calls prompt() itself after everything mode, with no prompt: a pass-through).
    prompts = [c for c in prompts if any(v is not None for v in c[1].values())]
    assert len(prompts) == 3
    expected = [
        (batch["boxes"][0][0], [[30, 30]], [1]),
        (batch["boxes"][0][1], [[150, 80]], [0]),
        (None, [[40, 60], [20, 100]], [1, 0]),
    ]
    for (_, kw, _), (box, points, labels) in zip(prompts, expected, strict=True):
        if box is None:
            assert kw["bboxes"] is None
        else:
            np.testing.assert_array_equal(kw["bboxes"], box[None])
        np.testing.assert_array_equal(kw["points"], points)
        np.testing.assert_array_equal(kw["labels"], labels)
    # Each mask is the union of what ultralytics selected, at the original size; score = best selected conf.
    picks = [(0, 0), (0, 1), (1, 0)]
    for (_, _, (sel,)), (row, k) in zip(prompts, picks, strict=True):
        h, w = images[row].shape[:2]
        assert out["masks"][row].shape[1:] == (h, w)
        if len(sel):
            np.testing.assert_array_equal(out["masks"][row][k], sel.masks.data.bool().any(0).numpy())
            assert out["mask_scores"][row][k] == pytest.approx(float(sel.boxes.conf.max()))
        else:
            assert not out["masks"][row][k].any() and out["mask_scores"][row][k] == 0.0
    assert sum(len(sel) for _, _, (sel,) in prompts) > 0  # the tiny model does produce masks to select from
    r, b = pixels[0][2][0, 0], pixels[0][2][0, 2]  # BasePredictor: RGB in [0, 1], image 0 is pure red
    assert (r == 1).any() and (b == 0).any() and not (b == 1).any()

    # One mask per instance whatever multimask asks; the Segmenter with clip_to_box (default) clips box instances.
    ((cand, scores),) = seg.backend([images[1]], [[InstancePrompt(None, np.array([[40, 60]]), np.array([1]))]], True)
    assert cand.shape == (1, 1, *TALL) and scores.shape == (1, 1) and scores.dtype == np.float32
    clipped = Segmenter(SegmentSpec(model="fastsam"), CPU, str(tiny))(_prompted_rows(images))
    _check_masks(clipped, images)


# ------------------------------------------------------------------------------------------- real weights


def _two_squares(h: int = 256, w: int = 384) -> np.ndarray:
    """Grey background, a red square A at x 64-192 and a blue square B at x 192-320 touching it (y 64-192)."""
    img = np.full((h, w, 3), 200, np.uint8)
    img[64:192, 64:192] = (220, 30, 30)
    img[64:192, 192:320] = (30, 30, 220)
    return img


def _square_masks(h: int = 256, w: int = 384) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((h, w), bool)
    a[64:192, 64:192] = True
    b = np.zeros_like(a)
    b[64:192, 192:320] = True
    return a, b


@pytest.mark.real_weights
@pytest.mark.skipif(not is_available("yolo-world", None), reason="yolov8s-worldv2.pt or CLIP ViT-B/32 missing")
def test_real_yolo_world_finds_the_bus() -> None:
    from PIL import Image
    from ultralytics.utils import ASSETS

    bus = np.asarray(Image.open(ASSETS / "bus.jpg").convert("RGB"))  # 1080x810, a bus and four people
    det = Detector(DetectSpec(model="yolo-world", queries=["bus", "person"], threshold=0.2), CPU, None)
    out = det(_rows([bus]))
    labels, boxes = out["labels"][0], out["boxes"][0]
    assert "bus" in labels and labels.count("person") >= 3
    x0, y0, x1, y1 = boxes[labels.index("bus")]
    assert (x1 - x0) > 0.8 * bus.shape[1]  # the bus spans the image width


@pytest.mark.real_weights
@pytest.mark.skipif(not is_available("mobile-sam", None), reason="mobile_sam.pt is not in cwd / ultralytics weights")
def test_real_mobile_sam_negative_point_excludes_the_touching_square() -> None:
    seg = Segmenter(SegmentSpec(model="mobile-sam", multimask="single"), CPU, None)
    a, b = _square_masks()
    batch = _rows([_two_squares()])
    batch["boxes"] = [np.array([[56, 56, 328, 200]], np.float32)]  # around both squares
    batch["prompt_points"] = [np.array([[128, 128], [256, 128]], np.float32)]
    batch["prompt_labels"] = [np.array([1, 0], np.int64)]
    mask = seg(batch)["masks"][0][0]
    assert mask[a].mean() > 0.8 and mask[b].mean() < 0.2


@pytest.mark.real_weights
@pytest.mark.skipif(not is_available("fastsam", None), reason="FastSAM-s.pt is not in cwd / ultralytics weights")
def test_real_fastsam_box_selects_its_square() -> None:
    seg = Segmenter(SegmentSpec(model="fastsam"), CPU, None)
    a, b = _square_masks()
    batch = _rows([_two_squares()])
    batch["boxes"] = [np.array([[60, 60, 196, 196]], np.float32)]  # around square A
    mask = seg(batch)["masks"][0][0]
    assert mask[a].mean() > 0.8 and mask[b].mean() < 0.2


def test_importing_ultralytics_leaves_pil_and_the_environment_alone(tiny: Path) -> None:
    # ultralytics patches PIL.Image.open to pip-install a HEIF plugin on the first unidentifiable file; after
    # our import (the `tiny` fixture built the ultralytics models, so it happened) garbage is still just
    # undecodable, with Pillow's own error, and nothing gets auto-installed.
    import PIL.Image
    import ultralytics.utils.checks as checks

    from promptpaint.io import DecodeError, decode_image
    from promptpaint.models import import_ultralytics

    import_ultralytics()
    assert PIL.Image.open.__module__ == "PIL.Image" and checks.AUTOINSTALL is False
    with pytest.raises(DecodeError) as err:
        decode_image(b"this is not an image at all" * 10, max_pixels=10**6, formats=["PNG", "JPEG"])
    assert err.value.kind == "undecodable" and "pi_heif" not in str(err.value)
