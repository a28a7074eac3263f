"""Tiny random-weight miniatures of every registry entry, for tests and the offline demo.

:func:`build_tiny` builds each entry from a config (random weights, deterministic per seed) and saves it
with the library's own ``save_pretrained`` (or the ultralytics checkpoint format) into
``<models_dir>/<name>``, the folder :func:`promptpaint.models.load_model` loads first: the miniatures go
through exactly the loading code real checkpoints go through. Each family has one builder in
``_BUILDERS`` (``_ENTRY_BUILDERS`` overrides it for an entry that shares a family but not a shape).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from promptpaint.models import MODELS, ULTRALYTICS_PREDICT_FILE, get_entry, import_ultralytics

__all__ = ["TINY_MARKER", "build_tiny", "tiny_tokenizer"]

# Written into every build_tiny folder; lets a rebuild replace that folder without clobbering real weights.
TINY_MARKER = "promptpaint_tiny.json"
# The tiny ultralytics models predict at 128 px (their folder's ULTRALYTICS_PREDICT_FILE) so CPU tests stay fast.
TINY_ULTRALYTICS_IMGSZ = 128


TINY_OWL_IMAGE_SIZE = 64  # vision input side; patch 8 -> 8x8 = 64 box predictions per image
TINY_SAM_IMAGE_SIZE = 64  # longest edge and pad size; patch 8 -> 8x8 image embedding, 32x32 low-res masks
TINY_TEXT_LEN_OWL = 16  # OWL's real text length
TINY_TEXT_LEN_SD = 77  # CLIP's real text length (the SD pipeline pads prompts to model_max_length)

# Merges for a few frequent English pieces, so common words become single tokens like in real CLIP.
_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "r</w>"),
    ("c", "ar</w>"),
    ("o", "g</w>"),
    ("d", "og</w>"),
    ("i", "n"),
    ("e", "r</w>"),
    ("o", "n</w>"),
    ("a", "n"),
)


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2 byte-level alphabet: the 256 printable stand-ins for bytes 0..255, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = [chr(b) for b in printable]
    chars += [chr(256 + i) for i in range(256 - len(printable))]  # the remaining bytes, remapped
    return chars


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (byte chars, their ``</w>`` forms, merge results, then BOS, then EOS last) and merges.

    BOS must not be id 0: OWL treats a query whose first id is 0 as padding and masks it out.
    EOS must be the highest id: CLIP-style text towers pool at ``input_ids.argmax(-1)``.
    """
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in _TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, list(_TINY_MERGES)


def tiny_tokenizer(model_max_length: int) -> Any:
    """CLIP BPE tokenizer over :func:`_tiny_vocab`; pad = EOS as in the real CLIP/SD tokenizers."""
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _tiny_text_config(tok: Any, max_len: int) -> dict[str, Any]:
    """Shared text-tower sizes; vocab and special ids follow the tiny tokenizer."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_len,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _tiny_owl_vision_config() -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": TINY_OWL_IMAGE_SIZE,
        "patch_size": 8,
    }


def _build_owl(config_cls: str, model_cls: str, image_processor: Any, processor_cls: str) -> list[Any]:
    import transformers

    tok = tiny_tokenizer(TINY_TEXT_LEN_OWL)
    config = getattr(transformers, config_cls)(
        text_config=_tiny_text_config(tok, TINY_TEXT_LEN_OWL),
        vision_config=_tiny_owl_vision_config(),
        projection_dim=32,
    )
    model = getattr(transformers, model_cls)(config)
    _calm_owl_heads(model)
    processor = getattr(transformers, processor_cls)(image_processor=image_processor, tokenizer=tok)
    return [processor, model]


def _calm_owl_heads(model: Any) -> None:
    """Shrink the random box and score heads so a tiny OWL behaves like a detector, not a saturated one.

    With default init the box head saturates its sigmoid (every box collapses onto the image corner)
    and every score is 1.0. Scaled down, boxes sit near their patch with a patch-sized extent and
    scores spread around 0.5, so thresholds, top-k and clipping are exercised by the tests.
    """
    import torch

    with torch.no_grad():
        model.box_head.dense2.weight.mul_(1e-3)
        model.box_head.dense2.bias.zero_()
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(1e-2)
            layer.bias.zero_()


def _build_owlv2() -> list[Any]:
    from transformers import Owlv2ImageProcessor

    # Owlv2ImageProcessor pads to a square itself, then resizes to this side.
    image_processor = Owlv2ImageProcessor(size={"height": TINY_OWL_IMAGE_SIZE, "width": TINY_OWL_IMAGE_SIZE})
    return _build_owl("Owlv2Config", "Owlv2ForObjectDetection", image_processor, "Owlv2Processor")


def _build_owlvit() -> list[Any]:
    from transformers import OwlViTImageProcessor

    side = {"height": TINY_OWL_IMAGE_SIZE, "width": TINY_OWL_IMAGE_SIZE}
    image_processor = OwlViTImageProcessor(size=side, crop_size=side, do_center_crop=False)
    return _build_owl("OwlViTConfig", "OwlViTForObjectDetection", image_processor, "OwlViTProcessor")


def _build_sam() -> list[Any]:
    """Tiny SAM. Every width must be equal (vision hidden/output, prompt encoder, mask decoder) because the
    decoder adds prompt and image embeddings, and the shared positional embedding has width/2 features."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    width, patch, side = 32, 8, TINY_SAM_IMAGE_SIZE
    config = SamConfig(
        vision_config={
            "hidden_size": width,
            "output_channels": width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": patch,
            "window_size": 4,  # 8x8 token grid -> 2x2 windows
            "global_attn_indexes": [1],
            "num_pos_feats": width // 2,
            "mlp_dim": 64,
        },
        prompt_encoder_config={
            "hidden_size": width,
            "image_size": side,
            "patch_size": patch,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": width,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    # Resize the longest edge to the model side and pad to a square of it, like 1024 for the real SAM.
    image_processor = SamImageProcessor(
        size={"longest_edge": side},
        pad_size={"height": side, "width": side},
        mask_size={"longest_edge": side // 4},
        mask_pad_size={"height": side // 4, "width": side // 4},
    )
    return [SamProcessor(image_processor=image_processor), SamModel(config)]


# Tiny diffusion pipelines, after diffusers' own ``get_dummy_components``: UNet sample 32 x VAE scale 2 (two VAE
# blocks) = 64 px natural resolution. SD1.5, SD2 and SDXL variants share the pieces below and differ only where
# the real checkpoints differ (UNet projection / added embeddings, text encoders), so the code paths that
# depend on those differences run in the tests.

TINY_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; SDXL embeds 6 time ids (original size, crop, target size)
TINY_SDXL_TEXT_PROJ_DIM = 32  # text_encoder_2 projection: the pooled prompt embedding that joins the time ids


def _tiny_unet(in_channels: int, **variant: Any) -> Any:
    """Two-block UNet (32, 64 ch, attention in the second; heads (2, 4) = head dim 16 in each block).

    ``in_channels`` 4 for text-to-image, 9 for inpainting (4 noisy latents + 4 masked-image latents + 1 mask);
    ``variant`` adds or overrides config keys (SD2 linear projection, SDXL text_time embedding).
    """
    from diffusers import UNet2DConditionModel

    config: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
    }
    return UNet2DConditionModel(**{**config, **variant})


def _tiny_vae() -> Any:
    """Two-block KL autoencoder: VAE scale factor 2, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )


def _tiny_clip_text(tok: Any, model_cls: str = "CLIPTextModel", **variant: Any) -> Any:
    """Tiny CLIP text tower over ``tok`` (77 tokens); ``variant`` e.g. hidden_act, projection_dim."""
    import transformers

    config = transformers.CLIPTextConfig(**_tiny_text_config(tok, TINY_TEXT_LEN_SD), **variant)
    return getattr(transformers, model_cls)(config)


def _tiny_ddim() -> Any:
    """SD's own beta schedule; DDIM is deterministic given the generator and fine with 1-2 steps."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_sd_components(in_channels: int, sd2: bool = False) -> dict[str, Any]:
    """UNet, VAE, tokenizer, text encoder and scheduler of a tiny SD1.5- or SD2-shaped pipeline.

    The construction order (UNet, VAE, text encoder) is part of the contract: build_tiny seeds once, so the
    order fixes the weights, and the SD1.5 inpaint miniature's weights are pinned by tests.
    SD2 differs from SD1.5 where the real checkpoints do: linear projections in the UNet's transformer blocks
    and a GELU (OpenCLIP) text encoder instead of quick-GELU.
    """
    unet = _tiny_unet(in_channels, **({"use_linear_projection": True} if sd2 else {}))
    vae = _tiny_vae()
    tok = tiny_tokenizer(TINY_TEXT_LEN_SD)
    text_encoder = _tiny_clip_text(tok, **({"hidden_act": "gelu"} if sd2 else {}))
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tok, "unet": unet, "scheduler": _tiny_ddim()}


_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _build_sd_inpaint() -> list[Any]:
    """Tiny SD1.5 inpaint pipeline (9-channel UNet)."""
    from diffusers import StableDiffusionInpaintPipeline

    return [StableDiffusionInpaintPipeline(**_tiny_sd_components(9), **_NO_SAFETY_CHECKER)]


def _build_sd2_inpaint() -> list[Any]:
    """Tiny SD2 inpaint pipeline: SD2-shaped 9-channel UNet (linear projection) and GELU text encoder."""
    from diffusers import StableDiffusionInpaintPipeline

    return [StableDiffusionInpaintPipeline(**_tiny_sd_components(9, sd2=True), **_NO_SAFETY_CHECKER)]


def _build_sd() -> list[Any]:
    """Tiny SD1.5 text-to-image pipeline (4-channel UNet)."""
    from diffusers import StableDiffusionPipeline

    return [StableDiffusionPipeline(**_tiny_sd_components(4), **_NO_SAFETY_CHECKER)]


def _tiny_sdxl_components(in_channels: int) -> dict[str, Any]:
    """Components of a tiny SDXL-shaped pipeline.

    Two text encoders like SDXL: a CLIPTextModel (quick-GELU, CLIP ViT-L's role) and a
    CLIPTextModelWithProjection (GELU, OpenCLIP bigG's role) whose projected pooled output joins the time ids.
    The UNet cross-attends to both encoders' hidden states concatenated (32 + 32) and adds a "text_time"
    embedding of 6 time ids x ``TINY_SDXL_TIME_EMBED_DIM`` + the pooled projection. Like the real base and
    inpainting 0.1 checkpoints, no aesthetic score (that is the refiner's 5-id conditioning).
    Euler discrete scheduler with the real SDXL settings (leading spacing, steps offset 1).
    """
    from diffusers import EulerDiscreteScheduler

    unet = _tiny_unet(
        in_channels,
        cross_attention_dim=64,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_TEXT_PROJ_DIM,
    )
    vae = _tiny_vae()
    tok, tok_2 = tiny_tokenizer(TINY_TEXT_LEN_SD), tiny_tokenizer(TINY_TEXT_LEN_SD)
    text_encoder = _tiny_clip_text(tok)
    text_encoder_2 = _tiny_clip_text(
        tok_2, "CLIPTextModelWithProjection", hidden_act="gelu", projection_dim=TINY_SDXL_TEXT_PROJ_DIM
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tok,
        "tokenizer_2": tok_2,
        "unet": unet,
        "scheduler": scheduler,
        "add_watermarker": False,
    }


def _build_sdxl_inpaint() -> list[Any]:
    """Tiny SDXL inpaint pipeline (9-channel SDXL-shaped UNet, two text encoders)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    return [StableDiffusionXLInpaintPipeline(**_tiny_sdxl_components(9), requires_aesthetics_score=False)]


def _build_sdxl() -> list[Any]:
    """Tiny SDXL text-to-image pipeline (4-channel SDXL-shaped UNet, two text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    return [StableDiffusionXLPipeline(**_tiny_sdxl_components(4))]


TINY_CLIP_IMAGE_SIZE = 32  # vision input side; patch 8 -> 4x4 patches


def _build_clip() -> list[Any]:
    """Tiny CLIP scorer: the shared tiny text tower (77 tokens) and a 2-layer ViT on 32 px inputs."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_tokenizer(TINY_TEXT_LEN_SD)
    config = CLIPConfig(
        text_config=_tiny_text_config(tok, TINY_TEXT_LEN_SD),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_CLIP_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    # Same preprocessing as the real checkpoint (shorter side resized, centre square cropped), at the tiny size.
    side = TINY_CLIP_IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return [CLIPProcessor(image_processor=image_processor, tokenizer=tok), CLIPModel(config)]


# --------------------------------------------------------------------------------------------------------
# ultralytics families
# --------------------------------------------------------------------------------------------------------


class _SaveAs:
    """Gives an object without ``save_pretrained`` build_tiny's contract: ``save(folder)`` writes its files."""

    def __init__(self, save: Callable[[Path], Any]):
        self._save = save

    def save_pretrained(self, folder: str | Path) -> None:
        self._save(Path(folder))


def _tiny_predict_settings() -> _SaveAs:
    settings = json.dumps({"imgsz": TINY_ULTRALYTICS_IMGSZ}) + "\n"
    return _SaveAs(lambda folder: (folder / ULTRALYTICS_PREDICT_FILE).write_text(settings))


def _tiny_yolo_init(model: Any) -> None:
    """Re-initialise a random YOLO so it behaves like a detector in tests: image-dependent scores around 0.5,
    boxes the size of their anchor cell.

    PyTorch's default conv init shrinks activations through YOLO's ~60 convs, so the head of a random net sees
    the same features for every image; He init keeps them alive (the DFL's fixed integral conv is left alone).
    The head's class logits start at -10 (WorldDetect's contrastive bias, Detect's prior), so nothing would pass
    a threshold: zeroed, and scaled up, scores spread between ~0.1 and ~0.9. Random box logits put each side ~7.5
    strides from its anchor; zero weights and a bias falling by 1 per DFL bin make each side ~0.6 stride.
    """
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.weight.requires_grad:
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        head = model.model[-1]
        for box in (seq[-1] for seq in head.cv2):
            box.weight.zero_()
            box.bias.copy_(-torch.arange(head.reg_max, dtype=torch.float32).repeat(4))
        if type(head).__name__ == "WorldDetect":
            for contrastive in head.cv4:  # BNContrastiveHead: logits = exp(logit_scale) * cos-like sim + bias
                contrastive.bias.zero_()
                contrastive.logit_scale.fill_(math.log(20.0))
        else:
            for cls in (seq[-1] for seq in head.cv3):
                cls.bias.zero_()
                cls.weight.mul_(100.0)


def _build_yolo_world() -> list[Any]:
    """Tiny YOLO-World v2: ultralytics' packaged yolov8-worldv2.yaml at scale n (3.7 M params, random) saved as an
    ultralytics checkpoint, and a tiny CLIP text tower with the real 512-d projection (txt_feats are (1, nc, 512))."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import_ultralytics()
    from ultralytics import YOLOWorld

    world = YOLOWorld("yolov8n-worldv2.yaml")  # built from the config inside the package: no download
    _tiny_yolo_init(world.model)
    tok = tiny_tokenizer(TINY_TEXT_LEN_SD)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**_tiny_text_config(tok, TINY_TEXT_LEN_SD), projection_dim=512))

    def save_text(folder: Path) -> None:
        text.save_pretrained(folder / "text_encoder")
        tok.save_pretrained(folder / "text_encoder")

    return [_SaveAs(lambda folder: world.save(folder / "model.pt")), _SaveAs(save_text), _tiny_predict_settings()]


def _build_mobile_sam() -> list[Any]:
    """MobileSAM with random weights, at full size (10.1 M params, 41 MB).

    ultralytics' SAM loader picks the architecture from the file name (``mobile_sam.pt`` -> build_mobile_sam,
    models/sam/build.py) and loads the state dict strictly, so no smaller network loads through it. The tiny
    folder predicts at 128 px instead of 1024 (TinyViT and the prompt encoder follow ``set_imgsz``): one image
    encoder pass takes ~0.05 s on one idle CPU core instead of ~3 s (~8 s on a busy 2-core box).
    """
    import_ultralytics()
    from ultralytics.models.sam.build import build_mobile_sam

    sam = build_mobile_sam()
    return [_SaveAs(lambda folder: torch.save(sam.state_dict(), folder / "mobile_sam.pt")), _tiny_predict_settings()]


def _build_fastsam() -> list[Any]:
    """Tiny FastSAM: FastSAM is a one-class YOLOv8-seg, so ultralytics' yolov8-seg.yaml at scale n with nc=1."""
    import_ultralytics()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load
    from ultralytics.utils import YAML

    cfg = {k: v for k, v in yaml_model_load("yolov8n-seg.yaml").items() if k != "yaml_file"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "yolov8n-seg.yaml"  # ultralytics reads the scale (n) and the task from the name
        YAML.save(path, {**cfg, "nc": 1})
        seg = YOLO(str(path))
    _tiny_yolo_init(seg.model)
    return [_SaveAs(lambda folder: seg.save(folder / "model.pt")), _tiny_predict_settings()]


# Each builder returns objects with ``save_pretrained``, all saved into the same folder.
_BUILDERS: dict[str, Callable[[], list[Any]]] = {
    "owlv2": _build_owlv2,
    "owlvit": _build_owlvit,
    "sam": _build_sam,
    "yolo-world": _build_yolo_world,
    "ultralytics-sam": _build_mobile_sam,
    "fastsam": _build_fastsam,
    "sd-inpaint": _build_sd_inpaint,
    "sdxl-inpaint": _build_sdxl_inpaint,
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "clip": _build_clip,
}


# Entries whose miniature differs from their family's (same loader and stage, another architecture).
_ENTRY_BUILDERS: dict[str, Callable[[], list[Any]]] = {
    "sd2-inpaint": _build_sd2_inpaint,
}


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished build into place, refusing to clobber a folder build_tiny did not create."""
    if target.exists():
        if not (target / TINY_MARKER).is_file():
            shutil.rmtree(tmp)
            raise FileExistsError(f"{target} exists and is not a promptpaint tiny model; not overwriting it")
        shutil.rmtree(target)
    os.replace(tmp, target)


def build_tiny(models_dir: str | Path, names: list[str] | None = None, seed: int = 0) -> list[Path]:
    """Build random-weight miniatures into ``models_dir/<name>`` and return the folders.

    Deterministic: each model is initialised right after ``torch.manual_seed(seed)``, so rebuilding gives
    identical weights. Each folder is written to a temp dir first and swapped in, so a crash never leaves
    a half-written model that :func:`resolve_source` would pick up.
    """
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    entries = [get_entry(n) for n in (names if names is not None else list(MODELS))]
    out = []
    for entry in entries:
        torch.manual_seed(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the final folder should be readable like any other
        for obj in _ENTRY_BUILDERS.get(entry.name, _BUILDERS[entry.family])():
            obj.save_pretrained(tmp)
        marker = {"name": entry.name, "family": entry.family, "seed": seed, "stands_in_for": entry.hub_id}
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        target = root / entry.name
        _replace_dir(tmp, target)
        out.append(target)
    return out
