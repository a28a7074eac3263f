"""YOLO-World v2: open-vocabulary detection through ultralytics, class text features from a transformers CLIP.

ultralytics would build its own CLIP through the OpenAI ``clip`` git package and a download; the registry pins
the same text weights on the hub instead, loaded next to the .pt checkpoint (``UltralyticsParts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptpaint.models.base import Detections, Family, LoadedModel
from promptpaint.models.registry import ModelEntry
from promptpaint.models.tiny import TINY_TEXT_LEN_SD, SaveAs, tiny_text_config, tiny_tokenizer
from promptpaint.models.ultralytics import (
    UltralyticsParts,
    bgr,
    import_ultralytics,
    predict_args,
    tiny_predict_settings,
    tiny_yolo_init,
    torch_threads_kept,
    ultralytics_loader,
)

IMGSZ = 640  # the square side the real checkpoint was trained at; the predictor letterboxes to it


class YoloWorldBackend:
    """YOLO-World with class text features from our CLIP text tower (transformers), set the way ultralytics does.

    ultralytics' ``WorldModel.set_classes`` builds ``clip:ViT-B/32`` through the OpenAI ``clip`` git package (and a
    download). What it computes is CLIP ViT-B/32 ``encode_text`` (text projection of the EOS token), cast to fp32
    and L2-normalised (``ultralytics/nn/text_model.py`` ``CLIP.encode_text``), shaped (1, nc, 512).
    ``CLIPTextModelWithProjection.text_embeds`` on ``openai/clip-vit-base-patch32`` is the same projection of the
    same weights (pooled at the EOS token: CLIP's EOS is the highest id, as in OpenAI's argmax pooling; padding
    after it is invisible under the causal mask), so we normalise it the same way and set it like
    ``YOLOWorld.set_classes``: ``txt_feats``, the head's ``nc``, ``names``, and a fresh predictor.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        parts: UltralyticsParts = loaded.processor
        self.world = loaded.model  # ultralytics YOLOWorld
        self.tokenizer = parts.tokenizer
        self.text_model = parts.text_model.to(device)
        self.args = predict_args(device, dtype, parts.imgsz)
        self.device = device
        self._features: dict[tuple[str, ...], torch.Tensor] = {}
        self._queries: tuple[str, ...] | None = None

    def text_features(self, queries: list[str]) -> torch.Tensor:
        """(1, nc, 512) float32 unit-norm text embeddings of ``queries`` on the model's device; cached per list."""
        key = tuple(queries)
        if key not in self._features:
            tokens = self.tokenizer(list(key), padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                emb = self.text_model(**tokens).text_embeds.float()
            self._features[key] = (emb / emb.norm(p=2, dim=-1, keepdim=True)).reshape(1, len(key), -1)
        return self._features[key]

    def set_queries(self, queries: list[str]) -> None:
        """``YOLOWorld.set_classes`` with our text features (no-op when the queries did not change)."""
        key = tuple(queries)
        if key == self._queries:
            return
        world_model = self.world.model
        world_model.txt_feats = self.text_features(queries)
        world_model.model[-1].nc = len(key)
        world_model.names = list(key)
        self.world.predictor = None  # its AutoBackend copied the old names
        self._queries = key

    def __call__(self, images: list[np.ndarray], queries: list[str], threshold: float) -> list[Detections]:
        # 1. Class text features for this query list.
        self.set_queries(queries)
        # 2. One batched predict; ultralytics letterboxes, runs NMS per class and scales boxes back to each image.
        with torch_threads_kept():
            results = self.world.predict([bgr(im) for im in images], conf=threshold, **self.args)
        # 3. Class index = query index (names are the queries, in order).
        return [
            (
                r.boxes.xyxy.float().cpu().numpy().astype(np.float32).reshape(-1, 4),
                r.boxes.conf.float().cpu().numpy().astype(np.float32).reshape(-1),
                r.boxes.cls.cpu().numpy().astype(np.int64).reshape(-1),
            )
            for r in results
        ]


# -------------------------------------------------------------------------------------------------------- tiny


def _build_yolo_world(entry: ModelEntry) -> list[Any]:
    """Tiny YOLO-World v2: ultralytics' packaged yolov8-worldv2.yaml at scale n (3.7 M params, random) saved as an
    ultralytics checkpoint, and a tiny CLIP text tower with the real 512-d projection (txt_feats are (1, nc, 512))."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import_ultralytics()
    from ultralytics import YOLOWorld

    world = YOLOWorld("yolov8n-worldv2.yaml")  # built from the config inside the package: no download
    tiny_yolo_init(world.model)
    tok = tiny_tokenizer(TINY_TEXT_LEN_SD)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_config(tok, TINY_TEXT_LEN_SD), projection_dim=512))

    def save_text(folder: Path) -> None:
        text.save_pretrained(folder / "text_encoder")
        tok.save_pretrained(folder / "text_encoder")

    return [SaveAs(lambda folder: world.save(folder / "model.pt")), SaveAs(save_text), tiny_predict_settings()]


YOLO_WORLD = Family(
    name="yolo-world",
    task="detect",
    load=ultralytics_loader("YOLOWorld", IMGSZ, text_tower=True),
    # The asset file is probed by is_available; these are the hub part: the CLIP text tower.
    probe_files=("config.json", "tokenizer_config.json"),
    build_tiny=_build_yolo_world,
    backend=YoloWorldBackend,
    defaults={"imgsz": IMGSZ},
)
