"""OWLv2 and OWL-ViT: open-vocabulary detection through transformers.

The two families share processor, backend and tiny shape; they differ in how the image reaches the square
the model sees (OWLv2 pads, OWL-ViT stretches), hence in how normalised boxes map back to pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from promptpaint.models.base import Detections, Family, LoadedModel, transformers_loader
from promptpaint.models.registry import ModelEntry
from promptpaint.models.tiny import tiny_text_config, tiny_tokenizer

TINY_OWL_IMAGE_SIZE = 64  # vision input side; patch 8 -> 8x8 = 64 box predictions per image
TINY_TEXT_LEN_OWL = 16  # OWL's real text length

_TARGET_SIZE: dict[str, Callable[[int, int], tuple[int, int]]] = {
    # OWLv2 pads the image bottom/right to a square before resizing, so predicted boxes are normalised to
    # the padded square. Passing (side, side) with side = max(h, w) maps them to original pixel coordinates
    # (the padding only ever lies beyond the image). transformers 5.23 also accepts (h, w) here because its
    # OWLv2 post-process scales by max(h, w) itself; (side, side) is correct in every version.
    "owlv2": lambda h, w: (max(h, w), max(h, w)),
    # OWL-ViT stretches the image to a square, so normalised boxes scale by the original (h, w).
    "owlvit": lambda h, w: (h, w),
}


def owl_target_size(h: int, w: int, family: str) -> tuple[int, int]:
    """``target_sizes`` entry (height, width) to pass to the OWL post-process for an h x w original image."""
    try:
        return _TARGET_SIZE[family](h, w)
    except KeyError:
        known = sorted(_TARGET_SIZE)
        raise ValueError(f"no OWL target-size rule for family {family!r}; known: {known}") from None


# Box-reduce images to at least this many times the model side before OWLv2's Gaussian (see OwlBackend._shrink).
SHRINK_TO = 4


class OwlBackend:
    """OWLv2 / OWL-ViT through their transformers processor (one padded batch of images x queries)."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        self.processor, self.model, self.family = loaded.processor, loaded.model, loaded.entry.family
        self.device, self.dtype = device, dtype

    def __call__(self, images: list[np.ndarray], queries: list[str], threshold: float) -> list[Detections]:
        # Back to pixel boxes of the original image (OWLv2 pads to a square first).
        sizes = [owl_target_size(im.shape[0], im.shape[1], self.family) for im in images]
        if self.family == "owlv2":
            images, sizes = zip(*(self._shrink(im) for im in images), strict=True)
        inputs = self.processor(text=[queries] * len(images), images=list(images), return_tensors="pt")
        inputs = {k: self._to_device(v) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        results = self.processor.post_process_grounded_object_detection(
            outputs=outputs, threshold=threshold, target_sizes=sizes
        )
        return [
            (
                r["boxes"].float().cpu().numpy().astype(np.float32).reshape(-1, 4),
                r["scores"].float().cpu().numpy().astype(np.float32).reshape(-1),
                r["labels"].cpu().numpy().astype(np.int64).reshape(-1),
            )
            for r in results
        ]

    def _shrink(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """An image at least 2 x SHRINK_TO times the model side, box-reduced by an integer k to >= SHRINK_TO x it.

        OWLv2's processor anti-aliases a downscale with a Gaussian whose kernel grows with the scale factor, as
        one dense conv over the full-size image: ~170 ms for a 1 MP photo at 960 px, ~1 s at the tiny set's
        64 px, seconds for a 12 MP photo at 960. Pillow's box reduce first, then the same Gaussian on the
        smaller image: on ultralytics' bus.jpg (810 x 1080) at 64 px, 12x faster, model input within 1.2 levels
        on average (99th percentile 6 levels); real OWLv2 (960 px) only takes this path for photos of 7680 px
        and more. The image is padded bottom/right to a multiple of k first (OWLv2 pads there anyway), so the
        normalized boxes map back to original pixels exactly: the returned target size is the padded square side.
        """
        h, w = image.shape[:2]
        k = min(h, w) // (SHRINK_TO * self.side)
        if k < 2:
            return image, (max(h, w), max(h, w))
        ph, pw = -(-h // k) * k, -(-w // k) * k
        if (ph, pw) != (h, w):
            padded = np.full((ph, pw, 3), 128, np.uint8)
            padded[:h, :w] = image
            image = padded
        small = np.asarray(Image.fromarray(image).reduce(k))
        side = max(small.shape[:2]) * k
        return small, (side, side)

    @property
    def side(self) -> int:
        size = self.processor.image_processor.size
        return int(size["height"] if isinstance(size, dict) else size.height)

    def _to_device(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return v.to(self.device, self.dtype)
        return v.to(self.device)


# ------------------------------------------------------------------------------------------------------- tiny


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
        text_config=tiny_text_config(tok, TINY_TEXT_LEN_OWL),
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
    with torch.no_grad():
        model.box_head.dense2.weight.mul_(1e-3)
        model.box_head.dense2.bias.zero_()
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(1e-2)
            layer.bias.zero_()


def _build_owlv2(entry: ModelEntry) -> list[Any]:
    from transformers import Owlv2ImageProcessor

    # Owlv2ImageProcessor pads to a square itself, then resizes to this side.
    image_processor = Owlv2ImageProcessor(size={"height": TINY_OWL_IMAGE_SIZE, "width": TINY_OWL_IMAGE_SIZE})
    return _build_owl("Owlv2Config", "Owlv2ForObjectDetection", image_processor, "Owlv2Processor")


def _build_owlvit(entry: ModelEntry) -> list[Any]:
    from transformers import OwlViTImageProcessor

    side = {"height": TINY_OWL_IMAGE_SIZE, "width": TINY_OWL_IMAGE_SIZE}
    image_processor = OwlViTImageProcessor(size=side, crop_size=side, do_center_crop=False)
    return _build_owl("OwlViTConfig", "OwlViTForObjectDetection", image_processor, "OwlViTProcessor")


_PROBE = ("config.json", "preprocessor_config.json")

OWLV2 = Family(
    name="owlv2",
    task="detect",
    load=transformers_loader("Owlv2Processor", "Owlv2ForObjectDetection"),
    probe_files=_PROBE,
    build_tiny=_build_owlv2,
    backend=OwlBackend,
    defaults={"target_size": _TARGET_SIZE["owlv2"]},
)

OWLVIT = Family(
    name="owlvit",
    task="detect",
    load=transformers_loader("OwlViTProcessor", "OwlViTForObjectDetection"),
    probe_files=_PROBE,
    build_tiny=_build_owlvit,
    backend=OwlBackend,
    defaults={"target_size": _TARGET_SIZE["owlvit"]},
)
