"""Stage backends for the ultralytics families: YOLO-World (detect), MobileSAM and FastSAM (segment).

Each runs through ultralytics' own predictor, so letterboxing, NMS and the mapping of boxes and masks back to
the original image are ultralytics'. Registered in ``DETECT_BACKENDS`` / ``SEGMENT_BACKENDS``.

Channel order: our rows are RGB; ultralytics takes numpy images as OpenCV BGR (``LoadPilAndNumpy`` keeps an
array as given, then ``BasePredictor.preprocess`` and the SAM ``Predictor.preprocess`` flip BGR -> RGB), so every
backend hands over ``rgb[..., ::-1]``. Checked in tests/test_ultralytics_models.py on the tensor the predictor
actually feeds the network: a pure-red input arrives with channel 0 = 1.0 and channel 2 = 0.0.

Precision: fp16 runtime -> ultralytics ``quantize=16`` (its replacement for ``half=True``); anything else runs
fp32 (ultralytics has no bf16 predict path, and on CPU it always runs fp32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from promptpaint.actors.prompts import InstancePrompt
from promptpaint.models import LoadedModel, UltralyticsParts

# (boxes (N, 4) float32 xyxy px of the original image, scores (N,) float32, query index (N,) int64)
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]
# candidate masks (I, M, H, W) bool at the original size, scores (I, M) float32
Candidates = tuple[np.ndarray, np.ndarray]

# FastSAM everything-mode thresholds: the values of ultralytics' FastSAM documentation.
FASTSAM_CONF = 0.4
FASTSAM_IOU = 0.9


def _bgr(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> contiguous BGR, what ultralytics expects of a numpy image."""
    return np.ascontiguousarray(image[..., ::-1])


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """ultralytics' ``select_device`` (run when a predictor is set up) sets torch's thread count for the whole
    process to its own choice (cpu count - 1, at most 8); keep the count the runtime chose for the other stages."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _predict_args(device: torch.device, dtype: torch.dtype, imgsz: int) -> dict[str, Any]:
    """Arguments every ultralytics predict call gets: explicit device, precision and size; no printing, no files."""
    return {
        "device": str(device),
        "quantize": 16 if dtype == torch.float16 else 32,
        "imgsz": imgsz,
        "verbose": False,
        "save": False,
    }


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
        self.args = _predict_args(device, dtype, parts.imgsz)
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
        with _torch_threads_kept():
            results = self.world.predict([_bgr(im) for im in images], conf=threshold, **self.args)
        # 3. Class index = query index (names are the queries, in order).
        return [
            (
                r.boxes.xyxy.float().cpu().numpy().astype(np.float32).reshape(-1, 4),
                r.boxes.conf.float().cpu().numpy().astype(np.float32).reshape(-1),
                r.boxes.cls.cpu().numpy().astype(np.int64).reshape(-1),
            )
            for r in results
        ]


def _sam_calls(prompts: list[InstancePrompt]) -> list[tuple[list[int], dict[str, Any]]]:
    """One image's instances -> ultralytics SAM prompt calls, one per prompt kind (has a box, number of points).

    SAM's prompt encoder takes boxes for every instance of a call or for none, and pads points with a dummy
    point only when there is no box, so instances of one kind share a call without padding (as SamBackend).
    Returns (instance indices, kwargs): ``bboxes`` (N, 4) float32 xyxy, ``points`` (N, P, 2) float32 and
    ``labels`` (N, P) int64 (1 positive, 0 negative), all in original-image pixels.
    """
    groups: dict[tuple[bool, int], list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault(p.kind, []).append(j)
    calls = []
    for (has_box, n_points), idx in groups.items():
        kwargs: dict[str, Any] = {}
        if has_box:
            kwargs["bboxes"] = np.stack([b for j in idx if (b := prompts[j].box) is not None]).astype(np.float32)
        if n_points:
            kwargs["points"] = np.stack([prompts[j].points for j in idx]).astype(np.float32)
            kwargs["labels"] = np.stack([prompts[j].labels for j in idx]).astype(np.int64)
        calls.append((idx, kwargs))
    return calls


class UltralyticsSamBackend:
    """MobileSAM (or any ultralytics SAM checkpoint) through ultralytics' SAM ``Predictor``.

    Per image: ``set_image`` runs the image encoder once, then one decoder call per prompt kind. Boxes, positive
    and negative points (label 0: SAM's background points) all go to SAM as given. ultralytics' SAM predictor
    takes one image at a time (``pre_transform`` asserts it), so images loop. ``multimask``: SAM's 3 candidates,
    else 1; scores are SAM's predicted IoU.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        from ultralytics.models.sam import Predictor

        parts: UltralyticsParts = loaded.processor
        self.predictor = Predictor(
            overrides={"task": "segment", "mode": "predict", **_predict_args(device, dtype, parts.imgsz)}
        )
        with _torch_threads_kept():
            self.predictor.setup_model(model=loaded.model.model, verbose=False)
        # The predictor drops candidates whose predicted IoU is <= conf, and its config only allows conf >= 0, so a
        # negative predicted IoU would always go. We need every candidate of every prompt, in order.
        self.predictor.args.conf = -math.inf

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]:
        m = 3 if multimask else 1
        out = []
        for image, prompts in zip(images, per_image, strict=True):
            h, w = image.shape[:2]
            cand = np.zeros((len(prompts), m, h, w), bool)
            scores = np.zeros((len(prompts), m), np.float32)
            if prompts:
                # 1. Image encoder, once per image.
                self.predictor.set_image(_bgr(image))
                # 2. One decoder call per prompt kind; masks come back at the original size, instance-major.
                for idx, kwargs in _sam_calls(prompts):
                    (res,) = self.predictor(**kwargs, multimask_output=multimask)
                    cand[idx] = res.masks.data.cpu().numpy().astype(bool).reshape(len(idx), m, h, w)
                    scores[idx] = res.boxes.conf.float().cpu().numpy().reshape(len(idx), m)
                self.predictor.reset_image()
            out.append((cand, scores))
        return out


class FastSamBackend:
    """FastSAM through ultralytics: everything-mode masks for the batch, then ``FastSAMPredictor.prompt`` per instance.

    FastSAM's prompts select whole masks among the everything-mode masks; they never shape a mask. ultralytics'
    rules (models/fastsam/predict.py), applied to each instance's own box and points:

    - box: the mask with the highest IoU against the box;
    - positive points: every mask containing one of them, minus masks containing a negative point;
    - only negative points: every mask containing none of them;
    - box and points: the union of both selections (a negative point does not remove the box's mask).

    Negative points are therefore honoured only at the level of whole masks, and a box with only negative
    points selects nearly everything outside them (``segment.clip_to_box`` keeps that inside the box).
    The instance's candidate is the union of the selected masks, its score the highest selected confidence;
    no selected mask gives an empty mask with score 0. FastSAM gives one mask per instance: M = 1 whatever
    ``multimask`` asks. Text prompts (CLIP) are not used.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
        parts: UltralyticsParts = loaded.processor
        self.fastsam = loaded.model  # ultralytics FastSAM
        self.args = _predict_args(device, dtype, parts.imgsz)

    def __call__(
        self, images: list[np.ndarray], per_image: list[list[InstancePrompt]], multimask: bool
    ) -> list[Candidates]:
        # 1. Everything mode for the whole batch; retina masks are at the original size.
        with _torch_threads_kept():
            everything = self.fastsam.predict(
                [_bgr(im) for im in images], conf=FASTSAM_CONF, iou=FASTSAM_IOU, retina_masks=True, **self.args
            )
        predictor = self.fastsam.predictor
        out = []
        for image, prompts, res in zip(images, per_image, everything, strict=True):
            h, w = image.shape[:2]
            cand = np.zeros((len(prompts), 1, h, w), bool)
            scores = np.zeros((len(prompts), 1), np.float32)
            for j, p in enumerate(prompts):
                # 2. ultralytics' own selection among this image's masks, for this instance's prompt.
                (sel,) = predictor.prompt(
                    [res],
                    bboxes=None if p.box is None else p.box[None],
                    points=p.points if len(p.points) else None,
                    labels=p.labels if len(p.points) else None,
                )
                if len(sel):
                    cand[j, 0] = sel.masks.data.bool().any(0).cpu().numpy()
                    scores[j, 0] = float(sel.boxes.conf.max())
            out.append((cand, scores))
        return out
