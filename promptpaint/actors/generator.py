"""Prompts -> images with a text-to-image diffusion pipeline (SD1.5, SDXL, ... by registry entry).

Every row gets its own ``torch.Generator`` seeded from (spec seed, row id), so a row's noise, and so its
image, does not depend on which other rows share its batch; rows still run together, ``spec.batch`` per
pipeline call. Batched float math rounds differently from unbatched math (about 1e-6 here, in convolutions
and matmuls alike), so a row generated alone and in a batch may differ by one level on a few pixels; the
same rows in the same batches give identical bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from promptpaint.actors.common import (
    ERROR_COLUMNS,
    Batch,
    active,
    derive_seed,
    ensure_column,
    run_with_fallback,
    timed,
)
from promptpaint.config import GenerateSpec, RuntimeSpec
from promptpaint.lora import apply_loras
from promptpaint.models import load_model, pipeline_default_resolution


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline ``output_type="np"`` floats (B, H, W, 3) in [0, 1] -> (B, H, W, 3) uint8, rounded like diffusers."""
    return (np.asarray(images, np.float32).clip(0.0, 1.0) * 255.0).round().astype(np.uint8)


class Generator:
    """Generate one image per row from its prompt.

    Batch in:  id list[str], prompt list[str] (optional: ``spec.prompt`` for every row),
               negative_prompt list[str] (optional: ``spec.negative_prompt``), status list[str] (optional)
    Batch out: + image list[(H, W, 3) uint8] ((0, 0, 3) for rows that failed or were inactive),
               seed list[int], status / error columns (``model_error`` for a row the pipeline failed on)

    H, W are ``spec.height`` / ``spec.width``, or the model's native size (512 SD1.5, 1024 SDXL, 64 tiny).
    """

    stage = "generate"

    def __init__(self, spec: GenerateSpec, runtime: RuntimeSpec, models_dir: str | None = None):
        self.spec = spec
        self.device, self.dtype = runtime.resolve()
        self.loaded = load_model(spec.model, models_dir, self.device, self.dtype, task="generate")
        self.pipe = self.loaded.model
        self.loras = apply_loras(self.pipe, [(r.path, r.scale) for r in spec.lora], spec.model, "generate.lora")
        native = pipeline_default_resolution(self.loaded)
        self.height, self.width = spec.height or native, spec.width or native
        # diffusers' step-end callback (pipe, step, timestep, kwargs) -> kwargs: the server counts steps there and
        # stops a cancelled request's loop (it raises)
        self.on_step: Any = None

    def configure(self, spec: GenerateSpec) -> None:
        """Per-request settings (steps, guidance, seed, size, negative prompt) for the loaded pipeline."""
        native = pipeline_default_resolution(self.loaded)
        self.spec = spec.model_copy(update={"model": self.spec.model, "lora": self.spec.lora})
        self.height, self.width = spec.height or native, spec.width or native

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        # 1. Columns. Generation batches start from prompts, not from the Reader: add the row plumbing if absent.
        ensure_column(batch, "status", str)
        for col in ERROR_COLUMNS:
            ensure_column(batch, col, str)
        images = ensure_column(batch, "image", lambda: np.zeros((0, 0, 3), np.uint8))
        seeds = ensure_column(batch, "seed", lambda: 0)
        for i, row_id in enumerate(batch["id"]):
            seeds[i] = derive_seed(self.spec.seed, row_id)
        n = len(batch["id"])
        prompts = batch["prompt"] if "prompt" in batch else [self.spec.prompt] * n
        negatives = batch["negative_prompt"] if "negative_prompt" in batch else [self.spec.negative_prompt] * n

        def generate(idx: list[int]) -> None:
            # 2. One pipeline call for the group; per-row CPU generators make the noise device- and batch-independent.
            out = self.pipe(
                prompt=[prompts[i] for i in idx],
                negative_prompt=[negatives[i] for i in idx],
                height=self.height,
                width=self.width,
                num_inference_steps=self.spec.steps,
                guidance_scale=self.spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in idx],
                output_type="np",
                **({"callback_on_step_end": self.on_step} if self.on_step else {}),
            ).images
            # 3. Attach the images; a row only gets one once the whole call succeeded.
            for i, image in zip(idx, to_uint8(out), strict=True):
                images[i] = image

        rows = active(batch)
        with timed(batch, self.stage, rows):
            for start in range(0, len(rows), self.spec.batch):
                run_with_fallback(batch, rows[start : start + self.spec.batch], self.stage, generate)
        return batch
