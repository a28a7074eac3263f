"""Stable Diffusion 1.x / 2.x through diffusers: inpainting (``sd-inpaint``) and text-to-image (``sd``).

The registry entry names the pipeline class, so one loader serves every SD checkpoint. The tiny pieces here
(UNet, VAE, scheduler) are shared with ``sdxl.py``: the miniatures differ only where the real checkpoints do.
"""

from __future__ import annotations

from typing import Any

from promptpaint.models.base import Family, LoadedModel, diffusers_loader
from promptpaint.models.registry import ModelEntry
from promptpaint.models.tiny import TINY_TEXT_LEN_SD, tiny_clip_text, tiny_tokenizer

# Bulk editing of user images: no safety checker (it also doubles memory).
PIPELINE_KWARGS: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
PROBE_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json")


def pipeline_default_resolution(loaded: LoadedModel) -> int:
    """Natural square side of a diffusers pipeline: UNet sample size x VAE scale.

    512 for SD1.5 / SD2 (64 x 8), 1024 for SDXL (128 x 8), 64 for the tiny models (32 x 2).
    """
    pipe = loaded.model
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def pipeline_size_multiple(loaded: LoadedModel) -> int:
    """Side lengths the pipeline's UNet runs cleanly at: VAE scale x 2^(UNet downsamplings), at least 8.

    At other multiples of 8 diffusers pads the UNet's skip connections (``forward_upsample_size``), which
    works but is not what the checkpoints were trained at. 64 for SD1.5 / SD2 (8 x 2^3), 32 for SDXL
    (8 x 2^2), 8 for the tiny models (2 x 2^1 = 4, raised to the VAE's own 8-pixel input rule).
    """
    pipe = loaded.model
    downsamplings = len(pipe.unet.config.block_out_channels) - 1
    return max(8, int(pipe.vae_scale_factor) * 2**downsamplings)


# Tiny diffusion pipelines, after diffusers' own ``get_dummy_components``: UNet sample 32 x VAE scale 2 (two VAE
# blocks) = 64 px natural resolution. SD1.5, SD2 and SDXL variants share the pieces below and differ only where
# the real checkpoints differ (UNet projection / added embeddings, text encoders), so the code paths that
# depend on those differences run in the tests.


def tiny_unet(in_channels: int, **variant: Any) -> Any:
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


def tiny_vae() -> Any:
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
    unet = tiny_unet(in_channels, **({"use_linear_projection": True} if sd2 else {}))
    vae = tiny_vae()
    tok = tiny_tokenizer(TINY_TEXT_LEN_SD)
    text_encoder = tiny_clip_text(tok, **({"hidden_act": "gelu"} if sd2 else {}))
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tok, "unet": unet, "scheduler": _tiny_ddim()}


_NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _build_sd(entry: ModelEntry) -> list[Any]:
    """Tiny SD1.5 text-to-image pipeline (4-channel UNet)."""
    from diffusers import StableDiffusionPipeline

    return [StableDiffusionPipeline(**_tiny_sd_components(4), **_NO_SAFETY_CHECKER)]


# Entries of the sd-inpaint family whose miniature is SD2-shaped (same loader and stage, another architecture).
_SD2_SHAPED = {"sd2-inpaint"}


def _build_sd_inpaint(entry: ModelEntry) -> list[Any]:
    """Tiny SD inpaint pipeline (9-channel UNet); SD2-shaped (linear projection, GELU text encoder) for SD2."""
    from diffusers import StableDiffusionInpaintPipeline

    components = _tiny_sd_components(9, sd2=entry.name in _SD2_SHAPED)
    return [StableDiffusionInpaintPipeline(**components, **_NO_SAFETY_CHECKER)]


SD_INPAINT = Family(
    name="sd-inpaint",
    task="inpaint",
    load=diffusers_loader(**PIPELINE_KWARGS),
    probe_files=PROBE_FILES,
    build_tiny=_build_sd_inpaint,
    defaults={"pipeline_kwargs": PIPELINE_KWARGS},
)

SD = Family(
    name="sd",
    task="generate",
    load=diffusers_loader(**PIPELINE_KWARGS),
    probe_files=PROBE_FILES,
    build_tiny=_build_sd,
    defaults={"pipeline_kwargs": PIPELINE_KWARGS},
)
