"""SD2 / SDXL inpainting and SD1.5 / SDXL text-to-image: tiny build -> load_model -> one batch through the stage.

Each new registry entry is built as a random-weight miniature, loaded through the same ``from_pretrained``
path as the real checkpoint and run through its stage: the unchanged Inpainter for inpaint entries, the
Generator for generate entries; then ``promptpaint generate`` end to end through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from promptpaint import models as M
from promptpaint import tiny as T
from promptpaint.actors.common import derive_seed, new_rows
from promptpaint.actors.generator import Generator
from promptpaint.actors.inpainter import Inpainter
from promptpaint.actors.maskops import dilate_and_feather
from promptpaint.cli import app
from promptpaint.config import GenerateSpec, InpaintSpec, RuntimeSpec
from promptpaint.io import read_png_text
from promptpaint.jobs.generate import JSONL_NAME, image_id

CPU = RuntimeSpec(device="cpu", dtype="float32")
NEW_ENTRIES = ["sd2-inpaint", "sdxl-inpaint", "sd15", "sdxl"]
H, W = 32, 40  # generation size: multiples of 8, smaller than the tiny models' native 64 x 64 (fast)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("diffusion-tiny")
    T.build_tiny(folder, NEW_ENTRIES)
    return str(folder)


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """Vertical gradient with a flat rectangle: structured, so a repaint is visible."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    img = np.broadcast_to((rng.integers(0, 256, 3) * (1 - t) + rng.integers(0, 256, 3) * t), (h, w, 3))
    img = img.astype(np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


# ------------------------------------------------------------------------------------------------ registry


def test_new_entries_pin_revisions_and_name_their_pipelines() -> None:
    import diffusers

    expected = {
        "sd2-inpaint": ("inpaint", "sd-inpaint", "StableDiffusionInpaintPipeline", 512),
        "sdxl-inpaint": ("inpaint", "sdxl-inpaint", "StableDiffusionXLInpaintPipeline", 1024),
        "sd15": ("generate", "sd", "StableDiffusionPipeline", 512),
        "sdxl": ("generate", "sdxl", "StableDiffusionXLPipeline", 1024),
    }
    for name, (task, family, pipeline, side) in expected.items():
        e = M.MODELS[name]
        assert (e.task, e.family, e.pipeline, e.default_resolution) == (task, family, pipeline, side)
        assert hasattr(diffusers, e.pipeline)
        assert e.revision and len(e.revision) == 40 and int(e.revision, 16) >= 0
        assert family in M.FAMILIES
    for family in ("sdxl", "sdxl-inpaint"):
        assert "text_encoder_2/config.json" in M.FAMILIES[family].probe_files


def test_tiny_architectures_match_their_families(models_dir: str) -> None:
    """SD2 and SDXL miniatures differ from SD1.5 where the real checkpoints do (so those code paths run)."""
    import torch

    pipes = {n: M.load_model(n, models_dir, torch.device("cpu"), torch.float32).model for n in NEW_ENTRIES}
    for name, pipe in pipes.items():
        assert type(pipe).__name__ == M.MODELS[name].pipeline
        assert pipe.unet.config.in_channels == (9 if M.MODELS[name].task == "inpaint" else 4)
    sd2 = pipes["sd2-inpaint"]
    assert sd2.unet.config.use_linear_projection and sd2.text_encoder.config.hidden_act == "gelu"
    for name in ("sdxl-inpaint", "sdxl"):
        pipe = pipes[name]
        cfg = pipe.unet.config
        assert cfg.addition_embed_type == "text_time"
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        # 6 time ids (original size, crop, target size) x time embed dim + the pooled text projection
        proj = pipe.text_encoder_2.config.projection_dim
        assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + proj
        assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert pipe.watermark is None  # off whether or not invisible-watermark is installed
        for tok in (pipe.tokenizer, pipe.tokenizer_2):
            assert 0 < tok.bos_token_id < tok.eos_token_id == len(tok) - 1  # CLIP argmax pooling finds EOS
    assert not pipes["sdxl-inpaint"].config.requires_aesthetics_score  # like the real inpainting-0.1


# ----------------------------------------------------------------------------------------------- inpaint


@pytest.mark.parametrize("name", ["sd2-inpaint", "sdxl-inpaint"])
def test_inpainter_runs_unchanged_with(name: str, models_dir: str) -> None:
    image = _scene(64, 96, 0)
    mask = np.zeros((64, 96), bool)
    mask[20:40, 30:60] = True
    dilated, blend = dilate_and_feather(mask, 2, 3)
    # resolution 32 keeps the test fast; the default would be the model's own side (tiny: UNet 32 x VAE 2)
    inpainter = Inpainter(InpaintSpec(model=name, steps=2, seed=0, resolution=32), CPU, models_dir)
    assert M.pipeline_default_resolution(inpainter.loaded) == 64 and inpainter.resolution == 32

    batch = new_rows(["a", "b"], ["mem/a.png", "mem/b.png"])
    batch["image"] = [image.copy(), image.copy()]
    batch["blend"] = [blend.copy(), blend.copy()]
    out = inpainter(batch)

    assert out["status"] == ["", ""], out["error_message"]
    assert out["seed"] == [derive_seed(0, "a"), derive_seed(0, "b")]
    untouched = blend == 0
    for edited in out["edited"]:
        assert edited.shape == image.shape and edited.dtype == np.uint8
        assert np.array_equal(edited[untouched], image[untouched])  # bit-identical outside the blend support
        assert np.any(edited != image, axis=2)[dilated].mean() > 0.5  # the masked region was repainted
    assert not np.array_equal(out["edited"][0][dilated], out["edited"][1][dilated])  # per-row seeds


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_generator_batch_and_batch_composition(name: str, models_dir: str) -> None:
    spec = GenerateSpec(model=name, steps=2, width=W, height=H, seed=3, batch=4)
    gen = Generator(spec, CPU, models_dir)
    ids, prompts = ["r0", "r1", "r2"], ["a photo of a dog", "the car", "a red bicycle"]
    three = gen({"id": list(ids), "prompt": list(prompts), "negative_prompt": ["", spec.negative_prompt, "blurry"]})

    assert three["status"] == ["", "", ""], three["error_message"]
    assert three["seed"] == [derive_seed(3, i) for i in ids]
    for img in three["image"]:
        assert img.shape == (H, W, 3) and img.dtype == np.uint8 and img.std() > 5
    assert not np.array_equal(three["image"][0], three["image"][1])
    assert all(t > 0 for t in three["t_generate_ms"])

    # The same row alone (no negative_prompt column: the spec's applies). Its noise comes from its own
    # generator, so only float rounding of the batched math may differ: at most a level, on a few pixels.
    alone = gen({"id": ["r1"], "prompt": ["the car"]})
    assert alone["seed"] == [three["seed"][1]]
    diff = np.abs(alone["image"][0].astype(np.int16) - three["image"][1].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01

    native = Generator(GenerateSpec(model=name, steps=1), CPU, models_dir)
    assert (native.height, native.width) == (64, 64)  # None = the model's size: tiny UNet 32 x VAE 2


def test_generator_isolates_a_failing_row_and_skips_inactive_rows(models_dir: str) -> None:
    gen = Generator(GenerateSpec(model="sd15", steps=1, width=16, height=16), CPU, models_dir)
    batch = {
        "id": ["bad", "ok", "skip"],
        "prompt": [None, "a dog", "a cat"],  # None: the pipeline rejects the whole call, then this row alone
        "status": ["", "", "error"],
        "error_stage": ["", "", "read"],
        "error_kind": ["", "", "undecodable"],
        "error_message": ["", "", "earlier failure"],
    }
    out = gen(batch)
    assert out["status"] == ["error", "", "error"]
    assert out["error_stage"][0] == "generate" and out["error_kind"][0] == "model_error"
    assert out["image"][0].shape == (0, 0, 3) and out["image"][1].shape == (16, 16, 3)
    assert out["image"][2].shape == (0, 0, 3) and out["error_message"][2] == "earlier failure"


def test_generate_spec_validates_size() -> None:
    assert GenerateSpec(width=512, height=768).height == 768
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerateSpec(width=500)


# --------------------------------------------------------------------------------------------------- CLI


def test_generate_cli_writes_pngs_jsonl_and_reruns_to_identical_bytes(models_dir: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "gen"
    args = ["generate", "a photo of a dog", "the car", "--out", str(out), "--models-dir", models_dir]
    args += ["--n", "2", "--seed", "7", "--steps", "2", "--width", str(W), "--height", str(H)]
    args += ["--negative", "blurry", "--no-progress", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "generated 4 image(s)" in res.stdout

    lines = [json.loads(x) for x in (out / JSONL_NAME).read_text().splitlines()]
    expected_ids = [image_id(p, k, 7, "sd15") for p in ("a photo of a dog", "the car") for k in range(2)]
    assert [r["id"] for r in lines] == expected_ids
    tag = lines[0]["settings"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}-{tag}.png" for i in expected_ids] + [JSONL_NAME])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    for rec in lines:
        assert rec["status"] == "ok" and rec["seed"] == derive_seed(7, rec["id"])
        assert (rec["model"], rec["revision"], rec["source"]) == ("sd15", "local", str(Path(models_dir) / "sd15"))
        text = read_png_text(first[rec["file"]])
        assert text["promptpaint:prompt"] == rec["prompt"] and text["promptpaint:negative_prompt"] == "blurry"
        assert text["promptpaint:seed"] == str(rec["seed"]) and text["promptpaint:model"] == "sd15"
        assert text["promptpaint:steps"] == "2" and text["promptpaint:guidance_scale"] == "7.5"
        assert text["promptpaint:source"] == rec["source"] and text["promptpaint:revision"] == "local"

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # images and jsonl: same bytes

    # Other settings: new files beside the old ones (same noise seeds), never a silent overwrite.
    more = runner.invoke(app, [*args, "--steps", "3"])  # the last --steps wins
    assert more.exit_code == 0, more.output
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(now[name] == data for name, data in first.items() if name != JSONL_NAME)
    assert len(now) == len(first) + 4
    recs = [json.loads(x) for x in (out / JSONL_NAME).read_text().splitlines()]
    assert len(recs) == 8 and {r["seed"] for r in recs} == {r["seed"] for r in lines}


def test_generate_cli_exit_codes(models_dir: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "gen"
    bad_size = runner.invoke(app, ["generate", "x", "--out", str(out), "--width", "60", "--models-dir", models_dir])
    assert bad_size.exit_code == 2 and "width" in bad_size.stderr and "multiple of 8" in bad_size.stderr
    wrong_task = runner.invoke(app, ["generate", "x", "--out", str(out), "--model", "sd2-inpaint"])
    assert wrong_task.exit_code == 2 and "inpaint model" in wrong_task.stderr
    no_n = runner.invoke(app, ["generate", "x", "--out", str(out), "--n", "0"])
    assert no_n.exit_code == 2 and "--n" in no_n.stderr
    missing = runner.invoke(app, ["generate", "x", "--out", str(out), "--models-dir", str(tmp_path / "empty")])
    assert missing.exit_code == 1
    assert "not available" in missing.stderr and "build-tiny" in missing.stderr
    assert not out.exists()  # nothing written for failed invocations
