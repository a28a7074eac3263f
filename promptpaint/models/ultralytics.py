"""What the ultralytics families (YOLO-World, MobileSAM, FastSAM) share: a side-effect-free import, where the
release assets are found, the loader, predict arguments and the tiny-model helpers.

ultralytics changes process state when imported (see :func:`import_ultralytics`); every use of it in
promptpaint goes through that function, so the patching stays here, with the families that need it.

A local folder ``<models_dir>/<name>/`` holds exactly one ``*.pt`` ultralytics checkpoint (the real asset file
can be copied in as is), YOLO-World also ``text_encoder/`` (a transformers CLIP text tower + tokenizer), and
optionally ULTRALYTICS_PREDICT_FILE. Without a local folder the asset is taken from where ultralytics itself
looks (working directory, then its weights dir), and downloaded by ultralytics only when it is online
(YOLO_OFFLINE unset); offline, a missing asset fails at once instead of in ultralytics' download retries.

Channel order: our rows are RGB; ultralytics takes numpy images as OpenCV BGR (``LoadPilAndNumpy`` keeps an
array as given, then ``BasePredictor.preprocess`` and the SAM ``Predictor.preprocess`` flip BGR -> RGB), so every
backend hands over ``rgb[..., ::-1]``. Checked in tests/test_ultralytics_models.py on the tensor the predictor
actually feeds the network: a pure-red input arrives with channel 0 = 1.0 and channel 2 = 0.0.

Precision: fp16 runtime -> ultralytics ``quantize=16`` (its replacement for ``half=True``); anything else runs
fp32 (ultralytics has no bf16 predict path, and on CPU it always runs fp32).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptpaint.models.base import Loader, hub_kwargs
from promptpaint.models.registry import ULTRALYTICS_ASSETS, ModelEntry
from promptpaint.models.tiny import SaveAs

ULTRALYTICS_PREDICT_FILE = "ultralytics_predict.json"  # {"imgsz": N}: the square side to predict at
# The tiny ultralytics models predict at 128 px (their folder's ULTRALYTICS_PREDICT_FILE) so CPU tests stay fast.
TINY_ULTRALYTICS_IMGSZ = 128


@dataclass
class UltralyticsParts:
    """``LoadedModel.processor`` of the ultralytics families: what a stage needs besides the ultralytics model.

    ``weights``: the .pt file loaded; ``imgsz``: square side the predictor letterboxes to; ``tokenizer`` /
    ``text_model``: YOLO-World's CLIP text tower (transformers ``CLIPTokenizer`` /
    ``CLIPTextModelWithProjection``, on the CPU until the stage moves it), None for the segmenters.
    """

    weights: str
    imgsz: int
    tokenizer: Any = None
    text_model: Any = None


def import_ultralytics() -> Any:
    """Import ultralytics without its process-wide side effects. Our code imports ultralytics only after calling this.

    - When OMP_NUM_THREADS is unset it sets it to 1 (a training default), which every process started
      afterwards (Ray workers) would inherit: removed again.
    - It replaces ``PIL.Image.open`` with a wrapper that, on the first file Pillow cannot identify, runs
      ``check_requirements("pi-heif")`` -- a ``pip install`` at job time when online, a ModuleNotFoundError
      offline -- so every undecodable input of the job would change its error (or the environment):
      ``PIL.Image.open`` is put back. We hand ultralytics decoded arrays, never files.
    - ``check_requirements`` auto-installs missing packages: switched off (``AUTOINSTALL``), a worker must not
      pip-install anything.
    """
    if "ultralytics" in sys.modules and getattr(sys.modules["ultralytics"], "_promptpaint_calmed", False):
        return sys.modules["ultralytics"]
    ours = "OMP_NUM_THREADS" not in os.environ
    import PIL.Image
    import ultralytics
    import ultralytics.utils.checks as checks
    import ultralytics.utils.patches as patches

    if ours:
        os.environ.pop("OMP_NUM_THREADS", None)
    PIL.Image.open = patches._image_open  # the original, which ultralytics saved before patching
    checks.AUTOINSTALL = False
    ultralytics._promptpaint_calmed = True
    return ultralytics


# ------------------------------------------------------------------------------------------------------ assets


def ultralytics_asset_path(asset: str) -> Path | None:
    """Where ultralytics would find ``asset`` without downloading: the working directory, then its weights dir."""
    import_ultralytics()
    from ultralytics.utils import SETTINGS

    for path in (Path(asset), Path(SETTINGS["weights_dir"]) / asset):
        if path.is_file():
            return path.resolve()
    return None


def ultralytics_fix(entry: ModelEntry) -> str:
    """How to make an ultralytics asset available (for ModelNotAvailable)."""
    import_ultralytics()
    from ultralytics.utils import SETTINGS

    fix = (
        f"put {entry.asset} ({ULTRALYTICS_ASSETS} release {entry.asset_release}) into the working directory or "
        f"ultralytics' weights dir {SETTINGS['weights_dir']}, or unset YOLO_OFFLINE so ultralytics downloads it"
    )
    if entry.hub_id != ULTRALYTICS_ASSETS:
        fix += f" (and have {entry.hub_id} in the HF cache or the hub reachable)"
    return fix


def _fetch_asset(asset: str, release: str) -> Path:
    """The asset file: found locally, else downloaded by ultralytics from ``release`` when it is online."""
    import_ultralytics()
    from ultralytics.utils import ONLINE, SETTINGS
    from ultralytics.utils.downloads import attempt_download_asset

    found = ultralytics_asset_path(asset)
    if found is not None:
        return found
    weights_dir = Path(SETTINGS["weights_dir"])
    if not ONLINE:  # YOLO_OFFLINE=1 (or no DNS) at ultralytics import
        raise FileNotFoundError(f"{asset} is in neither {Path.cwd()} nor {weights_dir} and ultralytics is offline")
    path = Path(attempt_download_asset(weights_dir / asset, release=release))
    if not path.is_file():
        raise FileNotFoundError(f"ultralytics could not download {asset} ({ULTRALYTICS_ASSETS} {release})")
    return path


def _local_checkpoint(folder: Path, entry: ModelEntry) -> Path:
    pts = sorted(folder.glob("*.pt"))
    if len(pts) != 1:
        found = [p.name for p in pts] or "none"
        raise FileNotFoundError(f"{folder} must hold exactly one .pt checkpoint (e.g. {entry.asset}); found {found}")
    return pts[0]


def sha256_prefix(path: Path, n: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:n]


def ultralytics_loader(model_cls: str, imgsz: int, text_tower: bool = False) -> Loader:
    """Loader through ultralytics' own class (``YOLOWorld`` / ``SAM`` / ``FastSAM``), the same for local and real.

    Returns (UltralyticsParts, ultralytics model, revision). ``imgsz`` is the family's predict size unless the
    folder's ULTRALYTICS_PREDICT_FILE says otherwise. The revision of a non-local load is
    ``<pinned revision>+sha256:<first 12 hex of the .pt file>``: the release (or, for YOLO-World, the resolved
    CLIP commit) and the hash of the file actually loaded, which may come from the working directory.
    """

    def load(entry: ModelEntry, source: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any, str | None]:
        asset, release = entry.asset, entry.asset_release
        if asset is None or release is None:
            raise ValueError(f"registry entry {entry.name!r} of ultralytics family {entry.family!r} names no asset")
        ultralytics = import_ultralytics()
        folder = Path(source)
        local = folder.is_dir()
        weights = _local_checkpoint(folder, entry) if local else _fetch_asset(asset, release)
        settings_file = folder / ULTRALYTICS_PREDICT_FILE
        settings = json.loads(settings_file.read_text()) if local and settings_file.is_file() else {}
        parts = UltralyticsParts(str(weights), int(settings.get("imgsz", imgsz)))
        pinned = entry.revision
        if text_tower:
            from transformers import CLIPTextModelWithProjection, CLIPTokenizer

            text_source = str(folder / "text_encoder") if local else entry.hub_id
            kw = hub_kwargs(revision)
            parts.tokenizer = CLIPTokenizer.from_pretrained(text_source, **kw)
            parts.text_model = CLIPTextModelWithProjection.from_pretrained(text_source, dtype=dtype, **kw).eval()
            pinned = getattr(parts.text_model.config, "_commit_hash", None) or pinned
        model = getattr(ultralytics, model_cls)(str(weights))
        return parts, model, None if local else f"{pinned}+sha256:{sha256_prefix(weights)}"

    return load


# ----------------------------------------------------------------------------------------------------- predict


def bgr(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> contiguous BGR, what ultralytics expects of a numpy image."""
    return np.ascontiguousarray(image[..., ::-1])


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """ultralytics' ``select_device`` (run when a predictor is set up) sets torch's thread count for the whole
    process to its own choice (cpu count - 1, at most 8); keep the count the runtime chose for the other stages."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def predict_args(device: torch.device, dtype: torch.dtype, imgsz: int) -> dict[str, Any]:
    """Arguments every ultralytics predict call gets: explicit device, precision and size; no printing, no files."""
    return {
        "device": str(device),
        "quantize": 16 if dtype == torch.float16 else 32,
        "imgsz": imgsz,
        "verbose": False,
        "save": False,
    }


# -------------------------------------------------------------------------------------------------------- tiny


def tiny_predict_settings() -> SaveAs:
    settings = json.dumps({"imgsz": TINY_ULTRALYTICS_IMGSZ}) + "\n"
    return SaveAs(lambda folder: (folder / ULTRALYTICS_PREDICT_FILE).write_text(settings))


def tiny_yolo_init(model: Any) -> None:
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
