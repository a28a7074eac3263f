"""Masked regions -> repainted with a diffusion inpainting pipeline, at the image's full resolution.

The model only ever sees a padded crop around the mask, resized to its working size; its output is
resized back and blended into the original with the feathered mask. Pixels where the blend weight is
0 are copied from the input, so they are bit-identical whatever the model does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from promptpaint.actors.common import Batch, active, derive_seed, ensure_column, run_with_fallback, timed
from promptpaint.config import InpaintSpec, RuntimeSpec, default_prompt_pair
from promptpaint.lora import apply_loras
from promptpaint.models import load_model, pipeline_default_resolution, pipeline_size_multiple
from promptpaint.prompting import PromptEncoder

# Crop aspect ratios the model is run at; a crop is squeezed to the nearest so rows batch together.
ASPECT_BUCKETS = (1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0)


@dataclass(frozen=True)
class Crop:
    """A window of the image (pixel bounds, end-exclusive) and the size the model runs it at."""

    y0: int
    y1: int
    x0: int
    x1: int
    model_h: int
    model_w: int


def plan_crop(blend: np.ndarray, padding: float, resolution: int, multiple: int = 8) -> Crop:
    """Square-ish padded window around the non-zero blend weights, and its model size.

    blend (H, W) float32. The window covers the whole support plus ``padding`` x its longer side on
    each side, is square where the image allows, and stays inside the image. The model size keeps the
    crop's aspect bucket at about ``resolution``^2 pixels, each side a multiple of ``multiple``.
    """
    h, w = blend.shape
    ys, xs = np.nonzero(blend)
    by0, by1, bx0, bx1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = math.ceil(max(by1 - by0, bx1 - bx0) * (1 + 2 * padding))
    ch, cw = min(max(side, by1 - by0), h), min(max(side, bx1 - bx0), w)
    y0 = min(max((by0 + by1 - ch) // 2, 0), h - ch)
    x0 = min(max((bx0 + bx1 - cw) // 2, 0), w - cw)
    aspect = min(ASPECT_BUCKETS, key=lambda a: abs(math.log(a) - math.log(cw / ch)))
    model_w = max(multiple, int(round(resolution * math.sqrt(aspect) / multiple)) * multiple)
    model_h = max(multiple, int(round(resolution / math.sqrt(aspect) / multiple)) * multiple)
    return Crop(y0, y0 + ch, x0, x0 + cw, model_h, model_w)


def paste(image: np.ndarray, generated: np.ndarray, blend: np.ndarray, crop: Crop) -> np.ndarray:
    """Blend a generated crop back into a copy of the image.

    image (H, W, 3) uint8, generated (ch, cw, 3) uint8 at crop size, blend (H, W) float32 -> (H, W, 3) uint8.
    Where ``blend == 0`` the input pixel is kept as is.
    """
    out = image.copy()
    region = out[crop.y0 : crop.y1, crop.x0 : crop.x1]
    a = blend[crop.y0 : crop.y1, crop.x0 : crop.x1, None]
    mixed = np.rint(a * generated.astype(np.float32) + (1.0 - a) * region.astype(np.float32))
    np.copyto(region, mixed.clip(0, 255).astype(np.uint8), where=a > 0)
    return out


class Inpainter:
    """Repaint the masked region(s) of each image.

    Batch in:  image list[(H, W, 3) uint8], blend list[(H, W) float32], id list[str]; optional pass_blends
               list[list[(H, W) float32]] and pass_prompts list[list[[prompt, negative]]] (from MaskOps with
               per-query prompts: one inpaint pass per distinct prompt, each over its own objects)
    Batch out: + edited list[(H, W, 3) uint8], seed list[int], crop list[[y0, y1, x0, x1]] (first pass),
               crops list[list[[y0, y1, x0, x1]]] and edit_prompts list[list[str]] (one per pass)

    Passes run in order, each on the previous pass's result (where two queries' masks overlap, the later
    query wins). Rows are grouped by model size and prompt and run as one pipeline call per group, each
    row with its own ``torch.Generator`` seeded from (spec seed, image id, pass): the result does not
    depend on the batch. The first pass uses the seed recorded in the ``seed`` column.
    """

    stage = "inpaint"

    def __init__(
        self,
        spec: InpaintSpec,
        runtime: RuntimeSpec,
        models_dir: str | None = None,
        mode: str = "edit",
        queries: Sequence[str] = (),
    ):
        self.mode, self.queries = mode, list(queries)
        self.spec = spec
        self.device, self.dtype = runtime.resolve()
        self.loaded = load_model(spec.model, models_dir, self.device, self.dtype, task="inpaint")
        self.pipe = self.loaded.model
        self.loras = apply_loras(self.pipe, [(r.path, r.scale) for r in spec.lora], spec.model, "inpaint.lora")
        self.resolution = spec.resolution or pipeline_default_resolution(self.loaded)
        self.multiple = pipeline_size_multiple(self.loaded)
        self.encode = PromptEncoder(self.pipe, spec.prompt_weighting)  # after the pipeline is on its device
        self.on_step: Any = None  # diffusers step-end callback (the server: step counts, cancellation)

    def configure(self, spec: InpaintSpec) -> None:
        """Per-request settings (prompts, steps, guidance, strength, seed, padding) for the loaded pipeline; the
        model, its LoRAs and the resolution stay as loaded (the server sets these per request group)."""
        self.spec = spec.model_copy(update={"model": self.spec.model, "lora": self.spec.lora})

    def prompts(self) -> tuple[str, str]:
        """Default (prompt, negative prompt); ``remove`` paints background and negates the objects."""
        return default_prompt_pair(self.spec, self.mode, self.queries)

    def passes(self, batch: Batch, i: int) -> list[tuple[np.ndarray, tuple[str, str]]]:
        """Row ``i``'s inpaint passes: (blend (H, W) float32, (prompt, negative prompt)) each."""
        blends = batch.get("pass_blends")
        if blends is None or not len(blends[i]):
            return [(batch["blend"][i], self.prompts())]
        prompts = batch.get("pass_prompts")
        pairs = [tuple(p) for p in prompts[i]] if prompts is not None and len(prompts[i]) else []
        return [(b, pairs[k] if k < len(pairs) else self.prompts()) for k, b in enumerate(blends[i])]

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> Batch:
        edited = ensure_column(batch, "edited", lambda: np.zeros((0, 0, 3), np.uint8))
        first_crop = ensure_column(batch, "crop", list)
        crops = ensure_column(batch, "crops", list)
        edit_prompts = ensure_column(batch, "edit_prompts", list)
        seeds = ensure_column(batch, "seed", lambda: 0)
        for i, row_id in enumerate(batch["id"]):
            seeds[i] = derive_seed(self.spec.seed, row_id)
        rows = active(batch)
        passes = {i: self.passes(batch, i) for i in rows}
        current = {i: batch["image"][i] for i in rows}
        for i in rows:
            crops[i], edit_prompts[i] = [], []

        def run_pass(k: int, idx: list[int], plans: dict[int, Crop], pair: tuple[str, str]) -> None:
            c0 = plans[idx[0]]
            images, masks, gens = [], [], []
            for i in idx:
                c = plans[i]
                blend = passes[i][k][0]
                img = current[i][c.y0 : c.y1, c.x0 : c.x1]
                msk = (blend[c.y0 : c.y1, c.x0 : c.x1] > 0).astype(np.uint8) * 255
                images.append(Image.fromarray(img).resize((c.model_w, c.model_h), Image.LANCZOS))
                masks.append(Image.fromarray(msk).resize((c.model_w, c.model_h), Image.NEAREST))
                seed = seeds[i] if k == 0 else derive_seed(self.spec.seed, f"{batch['id'][i]}:{k}")
                gens.append(torch.Generator("cpu").manual_seed(seed))
            result = self.pipe(
                **self.encode([pair[0]] * len(idx), [pair[1]] * len(idx)),
                image=images,
                mask_image=masks,
                height=c0.model_h,
                width=c0.model_w,
                num_inference_steps=self.spec.steps,
                guidance_scale=self.spec.guidance_scale,
                strength=self.spec.strength,
                generator=gens,
                output_type="np",
                **({"callback_on_step_end": self.on_step} if self.on_step else {}),
            ).images
            done = []
            for n, i in enumerate(idx):
                c = plans[i]
                gen = (np.asarray(result[n], np.float32).clip(0, 1) * 255).round().astype(np.uint8)
                gen = np.asarray(Image.fromarray(gen).resize((c.x1 - c.x0, c.y1 - c.y0), Image.LANCZOS))
                done.append((i, paste(current[i], gen, passes[i][k][0], c), [c.y0, c.y1, c.x0, c.x1]))
            # Commit only now: if anything above raised, a row-by-row retry starts from the untouched rows.
            for i, pasted, window in done:
                current[i] = pasted
                crops[i].append(window)
                edit_prompts[i].append(pair[0])

        with timed(batch, self.stage, rows):
            for k in range(max((len(p) for p in passes.values()), default=0)):
                due = [i for i in rows if k < len(passes[i]) and not batch["status"][i]]  # rows with a k-th pass
                plans = {i: plan_crop(passes[i][k][0], self.spec.padding, self.resolution, self.multiple) for i in due}
                groups: dict[tuple[int, int, str, str], list[int]] = {}
                for i in due:
                    groups.setdefault((plans[i].model_h, plans[i].model_w, *passes[i][k][1]), []).append(i)
                for (_, _, *pair), idx in groups.items():
                    run_with_fallback(
                        batch, idx, self.stage, lambda ix, k=k, pl=plans, pr=tuple(pair): run_pass(k, ix, pl, pr)
                    )
        for i in rows:
            if not batch["status"][i]:
                edited[i], first_crop[i] = current[i], crops[i][0]
        return batch
