"""CLIP scorer stage on the tiny random-weight CLIP, loaded through the real registry path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptpaint.actors.common import new_rows
from promptpaint.actors.scorer import Scorer
from promptpaint.config import QCSpec, RuntimeSpec, SpecError, build_spec
from promptpaint.models import is_available, load_model

CPU = RuntimeSpec(device="cpu")
PROMPTS = ["a red bicycle", "a dog", "the car", "a statue", "green grass", "a cat on a mat", "blue sky", "an old man"]


def image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def batch_of(edited: list[np.ndarray], crops: list[list[list[int]]], prompts: list[list[str]]) -> dict:
    b = new_rows([f"r{i}" for i in range(len(edited))], [f"p{i}.png" for i in range(len(edited))])
    b.update(edited=list(edited), crops=list(crops), edit_prompts=list(prompts))
    return b


def direct(loaded, window: np.ndarray, text: str) -> float:
    """Unclipped 100 x cosine straight from CLIPModel's feature methods, one image and one text."""
    with torch.inference_mode():
        pixels = loaded.processor(images=[window], return_tensors="pt")["pixel_values"]
        tokens = loaded.processor.tokenizer([text], return_tensors="pt")
        img = loaded.model.get_image_features(pixel_values=pixels).pooler_output
        txt = loaded.model.get_text_features(**tokens).pooler_output
        return float(100.0 * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum())


@pytest.fixture(scope="module")
def scorer(tiny_models: Path) -> Scorer:
    return Scorer(QCSpec(enabled=True), CPU, str(tiny_models))


def test_tiny_clip_loads_through_registry(tiny_models: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    loaded = load_model("clip", str(tiny_models), torch.device("cpu"), torch.float32, task="score")
    assert loaded.entry.hub_id == "openai/clip-vit-base-patch32" and loaded.revision == "local"
    assert isinstance(loaded.model, CLIPModel) and isinstance(loaded.processor, CLIPProcessor)
    assert loaded.processor(images=[image(0)], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    assert is_available("clip", str(tiny_models))
    with pytest.raises(ValueError, match="is a score model"):
        load_model("clip", str(tiny_models), torch.device("cpu"), torch.float32, task="inpaint")


def test_one_window_equals_direct_clip_computation(scorer: Scorer) -> None:
    crop = [8, 40, 10, 50]
    # Random weights give both signs of cosine; find one (image, prompt) pair of each, deterministically.
    raw = {(seed, p): direct(scorer.loaded, image(seed)[8:40, 10:50], p) for seed in (0, 1) for p in PROMPTS}
    pos = next(k for k, v in raw.items() if v > 1.0)
    neg = next(k for k, v in raw.items() if v < -1.0)
    b = scorer(batch_of([image(pos[0]), image(neg[0])], [[crop], [crop]], [[pos[1]], [neg[1]]]))
    assert b["clip_scores"][0].dtype == np.float32 and b["clip_scores"][0].shape == (1,)
    assert b["clip_scores"][0][0] == pytest.approx(raw[pos], abs=1e-3)
    assert b["clip_score"][0] == pytest.approx(raw[pos], abs=1e-3)
    assert b["clip_scores"][1][0] == 0.0 and b["clip_score"][1] == 0.0  # clipped at 0 like torchmetrics
    assert b["status"] == ["", ""]


def test_score_depends_on_the_window_only(scorer: Scorer) -> None:
    img, (y0, y1, x0, x1) = image(2), (8, 40, 16, 48)
    prompt = max(PROMPTS, key=lambda p: direct(scorer.loaded, img[y0:y1, x0:x1], p))
    outside = img.copy()
    keep = outside[y0:y1, x0:x1].copy()
    outside[:] = 255 - outside
    outside[y0:y1, x0:x1] = keep
    inside = img.copy()
    inside[y0:y1, x0:x1] = 255 - inside[y0:y1, x0:x1]
    got = [scorer(batch_of([im], [[[y0, y1, x0, x1]]], [[prompt]]))["clip_scores"][0] for im in (img, outside, inside)]
    assert got[0][0] > 0
    assert np.array_equal(got[0], got[1])  # every pixel outside the window changed: same score
    assert abs(float(got[0][0] - got[2][0])) > 1e-3  # the window changed: another score


def test_several_passes_one_model_call_min_per_row(scorer: Scorer) -> None:
    a, c = image(3), image(4, 40, 40)
    crops_a = [[0, 32, 0, 32], [10, 48, 20, 64], [0, 48, 0, 64]]
    prompts_a = [PROMPTS[0], PROMPTS[5], PROMPTS[0]]  # a repeated prompt is encoded once
    calls: dict[str, list[int]] = {"vision": [], "text": []}
    hooks = [
        scorer.backend.model.vision_model.register_forward_hook(
            lambda m, args, kw, out: calls["vision"].append(kw["pixel_values"].shape[0]), with_kwargs=True
        ),
        scorer.backend.model.text_model.register_forward_hook(
            lambda m, args, kw, out: calls["text"].append(kw["input_ids"].shape[0]), with_kwargs=True
        ),
    ]
    try:
        b = scorer(batch_of([a, c], [crops_a, [[5, 35, 0, 40]]], [prompts_a, [PROMPTS[6]]]))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"vision": [4], "text": [3]}  # 4 windows, 3 distinct prompts, one call each
    want_a = [
        max(direct(scorer.loaded, a[y0:y1, x0:x1], p), 0.0)
        for (y0, y1, x0, x1), p in zip(crops_a, prompts_a, strict=True)
    ]
    np.testing.assert_allclose(b["clip_scores"][0], want_a, atol=1e-3)
    assert b["clip_scores"][0].shape == (3,) and b["clip_scores"][1].shape == (1,)
    assert b["clip_score"][0] == float(b["clip_scores"][0].min())
    assert b["clip_score"][1] == pytest.approx(max(direct(scorer.loaded, c[5:35], PROMPTS[6]), 0.0), abs=1e-3)


def test_min_score_marks_rows_qc_failed(tiny_models: Path, scorer: Scorer) -> None:
    img, crop = image(5), [0, 48, 0, 64]
    raw = sorted((direct(scorer.loaded, img, p), p) for p in PROMPTS)
    (low, p_low), (high, p_high) = raw[-2], raw[-1]
    assert 0 < low < high - 0.2, raw
    threshold = round((low + high) / 2, 2)
    gate = Scorer(QCSpec(enabled=True, min_score=threshold), CPU, str(tiny_models))
    b = gate(batch_of([img, img, img], [[crop], [crop, crop], [crop]], [[p_high], [p_high, p_low], [p_low]]))
    assert b["status"] == ["", "qc_failed", "qc_failed"]
    assert b["error_stage"] == ["", "score", "score"] and b["error_kind"] == ["", "qc_failed", "qc_failed"]
    assert b["clip_score"][1] == pytest.approx(low, abs=1e-3)  # the worst pass decides
    msg = b["error_message"][1]
    assert f"{b['clip_score'][1]:.2f}" in msg and f"{threshold:g}" in msg and "pass 1" in msg and p_low in msg
    assert b["error_message"][0] == "" and b["clip_score"][0] == pytest.approx(high, abs=1e-3)


def test_inactive_and_malformed_rows(scorer: Scorer) -> None:
    img = image(6)
    b = batch_of(
        [np.zeros((0, 0, 3), np.uint8), img, img, img],
        [[], [[0, 10, 0, 10]], [[0, 10, 0, 10]], [[0, 99, 0, 10]]],
        [[], [PROMPTS[0]], [PROMPTS[0], PROMPTS[1]], [PROMPTS[0]]],
    )
    b["status"][0], b["error_stage"][0], b["error_kind"][0] = "no_detection", "detect", "no_detection"
    b = scorer(b)
    assert b["status"] == ["no_detection", "", "error", "error"]
    assert (b["error_stage"][0], b["error_kind"][0]) == ("detect", "no_detection")  # untouched
    assert b["clip_scores"][0].shape == (0,) and b["clip_score"][0] == 0.0
    assert b["clip_scores"][1].shape == (1,)
    assert b["error_kind"][2:] == ["bad_input", "bad_input"]
    assert "1 crop windows but 2 edit prompts" in b["error_message"][2]
    assert "outside the 48x64 image" in b["error_message"][3]
    with pytest.raises(ValueError, match=r"needs columns \['crops'\]"):
        scorer({k: v for k, v in batch_of([img], [[[0, 4, 0, 4]]], [["x"]]).items() if k != "crops"})


def test_whole_image_mode_and_determinism(tiny_models: Path, scorer: Scorer) -> None:
    img = image(7)
    whole = Scorer(QCSpec(enabled=True, crop=False), CPU, str(tiny_models))
    b = whole(batch_of([img], [[[0, 8, 0, 8], [8, 16, 8, 16]]], [[PROMPTS[2], PROMPTS[6]]]))
    want = [max(direct(whole.loaded, img, p), 0.0) for p in (PROMPTS[2], PROMPTS[6])]
    np.testing.assert_allclose(b["clip_scores"][0], want, atol=1e-3)

    def run(s: Scorer) -> list[np.ndarray]:
        return s(batch_of([img, image(8)], [[[0, 30, 0, 30]], [[4, 44, 4, 60]]], [[PROMPTS[3]], [PROMPTS[4]]]))[
            "clip_scores"
        ]

    first, again = run(scorer), run(Scorer(QCSpec(enabled=True), CPU, str(tiny_models)))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))


def test_qc_spec_validation() -> None:
    with pytest.raises(SpecError, match="min_score"):
        build_spec(QCSpec, {"min_score": 150}, "test")
    assert QCSpec().model_dump() == {"enabled": False, "model": "clip", "min_score": None, "crop": True}
