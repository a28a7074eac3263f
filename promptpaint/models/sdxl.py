"""SDXL through diffusers: inpainting (``sdxl-inpaint``) and text-to-image (``sdxl``).

Its own family because SDXL has two text encoders (so its prompts are encoded differently and its cache
probe includes ``text_encoder_2``) and no safety checker, but an optional watermark that is switched off.
"""

from __future__ import annotations

from typing import Any

from promptpaint.models.base import Family, diffusers_loader
from promptpaint.models.registry import ModelEntry
from promptpaint.models.sd import PROBE_FILES as SD_PROBE_FILES
from promptpaint.models.sd import tiny_unet, tiny_vae
from promptpaint.models.tiny import TINY_TEXT_LEN_SD, tiny_clip_text, tiny_tokenizer

# The invisible watermark is applied only when the optional package happens to be installed; switching it off
# makes outputs independent of the environment.
PIPELINE_KWARGS: dict[str, Any] = {"add_watermarker": False}
PROBE_FILES = (*SD_PROBE_FILES, "text_encoder_2/config.json")

TINY_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; SDXL embeds 6 time ids (original size, crop, target size)
TINY_SDXL_TEXT_PROJ_DIM = 32  # text_encoder_2 projection: the pooled prompt embedding that joins the time ids


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

    unet = tiny_unet(
        in_channels,
        cross_attention_dim=64,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_TEXT_PROJ_DIM,
    )
    vae = tiny_vae()
    tok, tok_2 = tiny_tokenizer(TINY_TEXT_LEN_SD), tiny_tokenizer(TINY_TEXT_LEN_SD)
    text_encoder = tiny_clip_text(tok)
    text_encoder_2 = tiny_clip_text(
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


def _build_sdxl_inpaint(entry: ModelEntry) -> list[Any]:
    """Tiny SDXL inpaint pipeline (9-channel SDXL-shaped UNet, two text encoders)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    return [StableDiffusionXLInpaintPipeline(**_tiny_sdxl_components(9), requires_aesthetics_score=False)]


def _build_sdxl(entry: ModelEntry) -> list[Any]:
    """Tiny SDXL text-to-image pipeline (4-channel SDXL-shaped UNet, two text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    return [StableDiffusionXLPipeline(**_tiny_sdxl_components(4))]


SDXL_INPAINT = Family(
    name="sdxl-inpaint",
    task="inpaint",
    load=diffusers_loader(**PIPELINE_KWARGS),
    probe_files=PROBE_FILES,
    build_tiny=_build_sdxl_inpaint,
    defaults={"pipeline_kwargs": PIPELINE_KWARGS},
)

SDXL = Family(
    name="sdxl",
    task="generate",
    load=diffusers_loader(**PIPELINE_KWARGS),
    probe_files=PROBE_FILES,
    build_tiny=_build_sdxl,
    defaults={"pipeline_kwargs": PIPELINE_KWARGS},
)
