"""Model registry, loaders and the tiny random-weight set, run through the real high-level APIs.

The tiny set is built once per module (a few seconds); every test then loads it with ``load_model``, the
same ``from_pretrained`` path real checkpoints take.
"""

import os
import shutil

# Before transformers / huggingface_hub are imported: they read these once, at import time.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE"):
    os.environ[_var] = "1"

from pathlib import Path  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from promptpaint import models as M  # noqa: E402
from promptpaint import tiny as T  # noqa: E402

CPU = torch.device("cpu")
QUERIES = ["a car", "a dog"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_models")
    T.build_tiny(root)
    return root


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path) -> dict[str, M.LoadedModel]:
    return {name: M.load_model(name, str(tiny_dir), CPU, torch.float32) for name in M.MODELS}


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- registry


def test_registry_is_consistent() -> None:
    for name, entry in M.MODELS.items():
        assert entry.name == name
        assert entry.family in M.FAMILIES
        # pinned commit, not a branch (ultralytics assets: a release tag of ultralytics/assets)
        assert entry.revision and (len(entry.revision) == 40 or entry.revision == entry.asset_release)
    assert M.MODELS["sd15-inpaint"].default_resolution == 512


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'") as info:
        M.get_entry("nope")
    assert all(name in str(info.value) for name in M.MODELS)
    with pytest.raises(ValueError):
        M.load_model("nope", None, CPU, torch.float32)


def test_resolve_source_prefers_local_folder(tiny_dir: Path, tmp_path: Path) -> None:
    assert M.resolve_source("sam", str(tiny_dir)) == (str(tiny_dir / "sam"), True)
    assert M.resolve_source("sam", str(tmp_path)) == ("facebook/sam-vit-base", False)
    assert M.resolve_source("sam", None) == ("facebook/sam-vit-base", False)
    assert M.is_available("sam", str(tiny_dir))


@pytest.mark.parametrize("name", list(M.MODELS))
def test_missing_model_raises_with_fix(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub froze HF_HUB_OFFLINE at import; force it in case another module imported it first.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if M.is_available(name, None):
        pytest.skip(f"the real {name} checkpoint is in the HF cache; load_model would succeed")
    entry = M.get_entry(name)
    with pytest.raises(M.ModelNotAvailable) as info:
        M.load_model(name, str(tmp_path), CPU, torch.float32)
    msg = str(info.value)
    where = str(tmp_path / name)
    for needle in (entry.hub_id, entry.revision, where, "build-tiny", "PROMPTPAINT_MODELS_DIR"):
        assert needle in msg


def test_incomplete_local_folder_raises(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dir / "owlv2", tmp_path / "owlv2", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(M.ModelNotAvailable, match="could not load it"):
        M.load_model("owlv2", str(tmp_path), CPU, torch.float32)


@pytest.mark.real_weights
@pytest.mark.parametrize("name", list(M.MODELS))
def test_real_checkpoint_loads_at_pinned_revision(name: str) -> None:
    if not M.is_available(name, None):
        pytest.skip(f"{M.get_entry(name).hub_id} is not in the HF cache")
    lm = M.load_model(name, None, CPU, torch.float32)
    assert lm.source == lm.entry.hub_id
    # ultralytics assets: the pin plus the hash of the .pt file actually loaded
    pinned = lm.revision.split("+sha256:")[0] if lm.entry.asset else lm.revision
    assert pinned == lm.entry.revision


# ---------------------------------------------------------------------------------------------- tiny set


def test_tiny_folders_and_tokenizer(tiny_dir: Path, loaded: dict[str, M.LoadedModel]) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(M.MODELS)  # no temp dirs left behind
    for name, lm in loaded.items():
        assert (tiny_dir / name / T.TINY_MARKER).is_file()
        assert lm.source == str(tiny_dir / name) and lm.revision == "local"
    tok = loaded["owlv2"].processor.tokenizer
    # BOS must not be 0 (OWL masks queries starting with id 0); EOS must be the top id (CLIP argmax pooling).
    assert 0 < tok.bos_token_id < tok.eos_token_id == len(tok) - 1 == tok.pad_token_id
    ids = tok(["a car"]).input_ids[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 4  # "car" is one merge


def test_build_is_deterministic_and_idempotent(tiny_dir: Path, tmp_path: Path) -> None:
    T.build_tiny(tmp_path)
    T.build_tiny(tmp_path, ["sam"])  # rebuilding over a tiny folder replaces it
    files = sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*.safetensors"))
    # every transformers model and every diffusers pipeline component is compared tensor by tensor
    assert {"owlv2", "owlvit", "sam", *(n for n, e in M.MODELS.items() if e.pipeline)} <= {r.parts[0] for r in files}
    for rel in files:
        a, b = load_file(tiny_dir / rel), load_file(tmp_path / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel


def test_build_refuses_to_clobber_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "model.safetensors").write_bytes(b"real weights")
    with pytest.raises(FileExistsError):
        T.build_tiny(tmp_path, ["sam"])
    assert (tmp_path / "sam" / "model.safetensors").read_bytes() == b"real weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam"]


# ---------------------------------------------------------------------------------------------- detect


@pytest.mark.parametrize("name", ["owlv2", "owlvit"])
def test_owl_detects_through_processor(name: str, loaded: dict[str, M.LoadedModel]) -> None:
    lm = loaded[name]
    images = [_image(120, 200, 0), _image(90, 60, 1)]
    inputs = lm.processor(text=[QUERIES] * 2, images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, T.TINY_OWL_IMAGE_SIZE, T.TINY_OWL_IMAGE_SIZE)
    assert inputs["input_ids"].shape == (4, T.TINY_TEXT_LEN_OWL)  # (batch * queries, text len)
    with torch.no_grad():
        out = lm.model(**inputs)
    assert out.logits.shape == (2, 64, 2)  # (batch, patches, queries)
    sizes = [M.owl_target_size(im.height, im.width, lm.entry.family) for im in images]
    results = lm.processor.post_process_grounded_object_detection(
        out, threshold=0.0, target_sizes=sizes, text_labels=[QUERIES] * 2
    )
    for res in results:
        assert res["boxes"].shape[0] > 0 and res["boxes"].shape[1] == 4
        assert res["boxes"].dtype == torch.float32
        assert set(res["labels"].tolist()) <= {0, 1}
        assert set(res["text_labels"]) <= set(QUERIES)


def test_owl_target_size() -> None:
    assert M.owl_target_size(120, 200, "owlv2") == (200, 200)  # boxes live in the padded square
    assert M.owl_target_size(120, 200, "owlvit") == (120, 200)  # boxes live in the stretched image
    with pytest.raises(ValueError):
        M.owl_target_size(1, 1, "sam")


# ---------------------------------------------------------------------------------------------- segment


def _sam_masks(lm: M.LoadedModel, images: list[Image.Image], boxes: list[list[list[int]]]) -> tuple:
    inputs = lm.processor(images=images, input_boxes=boxes, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**inputs, multimask_output=True)
    masks = lm.processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    return out, masks


def test_sam_masks_at_original_size(loaded: dict[str, M.LoadedModel]) -> None:
    lm = loaded["sam"]
    out, masks = _sam_masks(lm, [_image(120, 200)], [[[10, 20, 100, 110], [50, 5, 190, 60]]])
    assert out.iou_scores.shape == (1, 2, 3)  # (images, boxes, multimask outputs)
    assert masks[0].shape == (2, 3, 120, 200) and masks[0].dtype == torch.bool


def test_sam_batch_of_two_images(loaded: dict[str, M.LoadedModel]) -> None:
    boxes = [[[10, 20, 100, 110], [50, 5, 190, 60]], [[0, 0, 50, 50], [20, 100, 90, 290]]]
    out, masks = _sam_masks(loaded["sam"], [_image(120, 200, 0), _image(300, 100, 1)], boxes)
    assert out.iou_scores.shape == (2, 2, 3)
    assert [tuple(m.shape) for m in masks] == [(2, 3, 120, 200), (2, 3, 300, 100)]


# ---------------------------------------------------------------------------------------------- inpaint


def test_sd_inpaint_batch_is_seeded(loaded: dict[str, M.LoadedModel]) -> None:
    lm = loaded["sd15-inpaint"]
    side = M.pipeline_default_resolution(lm)
    assert side == 64
    mask = np.zeros((side, side), np.uint8)
    mask[16:48, 16:48] = 255

    def run() -> np.ndarray:
        return lm.model(
            prompt=["a red bicycle"] * 2,
            negative_prompt=["blurry"] * 2,
            image=[_image(side, side, 0), _image(side, side, 1)],
            mask_image=[Image.fromarray(mask)] * 2,
            height=side,
            width=side,
            num_inference_steps=2,
            guidance_scale=7.5,
            strength=1.0,
            generator=[torch.Generator("cpu").manual_seed(1), torch.Generator("cpu").manual_seed(2)],
            output_type="np",
        ).images

    first, second = run(), run()
    assert first.shape == (2, side, side, 3) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
