"""SAM through transformers: box- and point-prompted masks, the image encoder run once per image.

The prompt helpers live here because only this backend needs them: SAM's prompt encoder takes boxes for
all instances of a call or none, so instances are grouped by prompt kind instead of padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from promptpaint.actors.prompts import InstancePrompt
from promptpaint.models.base import Candidates, Family, LoadedModel, transformers_loader
from promptpaint.models.registry import ModelEntry

TINY_SAM_IMAGE_SIZE = 64  # longest edge and pad size; patch 8 -> 8x8 image embedding, 32x32 low-res masks


@dataclass
class SamCall:
    """One SAM prompt-decoder call: the instances of one prompt kind across a batch of images.

    ``rows`` index the images of the batch that take part; ``instances[b]`` lists, for ``rows[b]``, which
    of that image's instances fill the first ``len(instances[b])`` slots (the remaining slots repeat the
    first instance and are dropped). Arrays are in original-image pixels:
    input_boxes (B, N, 4) float32 or None, input_points (B, N, P, 2) float32 and input_labels (B, N, P)
    int64, or None when the kind has no points.
    """

    has_box: bool
    n_points: int
    rows: list[int]
    instances: list[list[int]]
    input_boxes: np.ndarray | None
    input_points: np.ndarray | None
    input_labels: np.ndarray | None


def build_sam_prompts(per_image: list[list[InstancePrompt]]) -> list[SamCall]:
    """Per-image instance prompts -> SAM calls, one per prompt kind (has a box, number of points).

    SAM's prompt encoder takes ``input_boxes`` for every instance of a call or for none, and its
    decoder has no attention mask: a padding point (label -10, what ``SamProcessor`` pads ragged point
    lists with) still enters the decoder as a zero token and shifts the masks. So instead of padding,
    instances are grouped by kind; inside a call only the instance count differs between images, padded
    with copies of the image's first instance (a copy of a prompt is an independent, identical query).
    A batch with detector boxes only is one call, exactly the box-only call SAM always got.
    """
    groups: dict[tuple[bool, int], dict[int, list[int]]] = {}
    for r, prompts in enumerate(per_image):
        for j, p in enumerate(prompts):
            groups.setdefault(p.kind, {}).setdefault(r, []).append(j)
    calls = []
    for (has_box, n_points), by_row in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        rows = sorted(by_row)
        n_max = max(len(v) for v in by_row.values())
        boxes, points, labels = [], [], []
        for r in rows:
            js = by_row[r]
            slots = [per_image[r][j] for j in js] + [per_image[r][js[0]]] * (n_max - len(js))
            if has_box:
                boxes.append(np.stack([p.box for p in slots]).astype(np.float32))
            if n_points:
                points.append(np.stack([p.points for p in slots]).astype(np.float32))
                labels.append(np.stack([p.labels for p in slots]).astype(np.int64))
        calls.append(
            SamCall(
                has_box=has_box,
                n_points=n_points,
                rows=rows,
                instances=[by_row[r] for r in rows],
                input_boxes=np.stack(boxes) if has_box else None,
                input_points=np.stack(points) if n_points else None,
                input_labels=np.stack(labels) if n_points else None,
            )
        )
    return calls


def to_model_coords(xy: np.ndarray, original_size: tuple[int, int], reshaped_size: tuple[int, int]) -> np.ndarray:
    """Pixel x/y pairs (..., 2k) of an (h, w) image -> SAM's resized frame, as ``SamProcessor`` scales them."""
    (old_h, old_w), (new_h, new_w) = original_size, reshaped_size
    out = np.asarray(xy, np.float64).copy()
    out[..., 0::2] *= new_w / old_w
    out[..., 1::2] *= new_h / old_h
    return out


class SamBackend:
    """SAM through transformers: the image encoder once per image, one decoder call per prompt kind."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.processor, self.model = loaded.processor, loaded.model
        self.device, self.dtype = device, dtype

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]:
        inputs = self.processor(images=images, return_tensors="pt")
        orig = inputs["original_sizes"]
        resized = inputs["reshaped_input_sizes"]
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, self.dtype))
        cand: list[list[np.ndarray]] = [[None] * len(p) for p in per_image]  # (M, H, W) per instance
        ious: list[list[np.ndarray]] = [[None] * len(p) for p in per_image]  # (M,) per instance
        for call in build_sam_prompts(per_image):
            sel = call.rows
            kwargs = {}
            if call.input_boxes is not None:
                kwargs["input_boxes"] = self._coords(call.input_boxes, orig, resized, sel)
            if call.input_points is not None:
                kwargs["input_points"] = self._coords(call.input_points, orig, resized, sel)
                kwargs["input_labels"] = torch.from_numpy(call.input_labels).to(self.device)
            emb = embeddings if len(sel) == len(images) else embeddings[sel]
            out = self.model(image_embeddings=emb, multimask_output=multimask, **kwargs)
            # (B, N, M, h, w) low-res logits -> list of (N, M, H, W) bool at the original size
            full = self.processor.image_processor.post_process_masks(
                out.pred_masks.float().cpu(), orig[sel], resized[sel]
            )
            iou = out.iou_scores.float().cpu().numpy()
            for b, (r, js) in enumerate(zip(sel, call.instances, strict=True)):
                m = full[b].numpy().astype(bool)
                for n, j in enumerate(js):
                    cand[r][j], ious[r][j] = m[n], iou[b, n]
        return [(np.stack(c), np.stack(s).astype(np.float32)) for c, s in zip(cand, ious, strict=True)]

    def _coords(self, xy: np.ndarray, orig: torch.Tensor, resized: torch.Tensor, sel: list[int]) -> torch.Tensor:
        """(B, ..., 2k) pixel coordinates of the images ``sel`` -> SAM-frame tensor on the model's device."""
        scaled = np.stack(
            [
                to_model_coords(x, tuple(orig[r].tolist()), tuple(resized[r].tolist()))
                for x, r in zip(xy, sel, strict=True)
            ]
        )
        return torch.from_numpy(scaled).to(self.device, self.dtype)


# ------------------------------------------------------------------------------------------------------ tiny


def _build_sam(entry: ModelEntry) -> list[Any]:
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


SAM = Family(
    name="sam",
    task="segment",
    load=transformers_loader("SamProcessor", "SamModel"),
    probe_files=("config.json", "preprocessor_config.json"),
    build_tiny=_build_sam,
    backend=SamBackend,
)
