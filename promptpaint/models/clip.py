"""CLIP through transformers: image-text agreement for the QC score stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from promptpaint.models.base import Family, LoadedModel, transformers_loader
from promptpaint.models.registry import ModelEntry
from promptpaint.models.tiny import TINY_TEXT_LEN_SD, tiny_text_config, tiny_tokenizer

TINY_CLIP_IMAGE_SIZE = 32  # vision input side; patch 8 -> 4x4 patches


class ClipBackend:
    """CLIP through transformers: every image and every distinct text of a call in one forward pass."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.processor, self.model = loaded.processor, loaded.model
        self.device, self.dtype = device, dtype
        # Longer prompts are cut to the text tower's positions (77 for CLIP), as torchmetrics does.
        self.max_length = min(
            int(self.processor.tokenizer.model_max_length),
            int(self.model.config.text_config.max_position_embeddings),
        )

    def __call__(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts; pass one text per image")
        if not images:
            return np.zeros((0,), np.float32)
        unique = list(dict.fromkeys(texts))  # prompts repeat across rows: encode each once
        which = torch.tensor([unique.index(t) for t in texts], device=self.device)
        # The processor resizes each window's shorter side to the model size and centre-crops a square.
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = self.processor.tokenizer(
            unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            pixel_values=pixels.to(self.device, self.dtype),
        )
        # image_embeds / text_embeds are the projected features; cosine in fp32 whatever the model dtype.
        img = F.normalize(out.image_embeds.float(), dim=-1)
        txt = F.normalize(out.text_embeds.float(), dim=-1)
        cos = (img * txt[which]).sum(-1)
        return (100.0 * cos).clamp_min(0.0).cpu().numpy().astype(np.float32)


# -------------------------------------------------------------------------------------------------------- tiny


def _build_clip(entry: ModelEntry) -> list[Any]:
    """Tiny CLIP scorer: the shared tiny text tower (77 tokens) and a 2-layer ViT on 32 px inputs."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_tokenizer(TINY_TEXT_LEN_SD)
    config = CLIPConfig(
        text_config=tiny_text_config(tok, TINY_TEXT_LEN_SD),
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


CLIP = Family(
    name="clip",
    task="score",
    load=transformers_loader("CLIPProcessor", "CLIPModel"),
    probe_files=("config.json", "preprocessor_config.json"),
    build_tiny=_build_clip,
    backend=ClipBackend,
)
