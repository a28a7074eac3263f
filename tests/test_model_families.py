"""Every registry entry has a complete family, the registry imports without torch, and weights_fingerprint
tells weights apart by content while ignoring where the folder lies."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from promptpaint.models import FAMILIES, MODELS, weights_fingerprint
from promptpaint.models.fingerprint import EDGE_BYTES, WHOLE_FILE_LIMIT

STAGE_TASKS = ("detect", "segment", "score")  # tasks whose stage calls a family backend


@pytest.mark.parametrize("name", list(MODELS))
def test_every_entry_has_a_complete_family(name: str) -> None:
    entry = MODELS[name]
    family = FAMILIES[entry.family]
    assert family.name == entry.family and family.task == entry.task
    assert callable(family.load) and callable(family.build_tiny)
    # HF cache probe files; an ultralytics asset (not a hub repo) is probed by its file instead.
    assert family.probe_files or (entry.asset is not None and entry.hub_id == "ultralytics/assets")
    if entry.task in STAGE_TASKS:
        assert callable(family.backend)
    else:
        assert family.backend is None  # inpaint / generate stages drive their diffusers pipeline themselves
    assert isinstance(family.defaults, Mapping)


def test_every_family_serves_a_registry_entry() -> None:
    assert {e.family for e in MODELS.values()} == set(FAMILIES)


def test_registry_imports_without_torch() -> None:
    code = (
        "import sys, promptpaint.models.registry, promptpaint.models; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'ultralytics') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- fingerprint


def _weights(root: Path) -> Path:
    folder = root / "sam"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 32}\n')
    (folder / "sub" / "small.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "big.bin").write_bytes(os.urandom(WHOLE_FILE_LIMIT + 1024))  # hashed by head and tail only
    return folder


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fingerprint_of_a_local_folder(tmp_path: Path) -> None:
    folder = _weights(tmp_path / "a")
    first = weights_fingerprint("sam", str(tmp_path / "a"))
    assert first.startswith("local:sha256:") and len(first) == len("local:sha256:") + 16
    assert weights_fingerprint("sam", str(tmp_path / "a")) == first

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another place, same weights
    assert weights_fingerprint("sam", str(tmp_path / "b")) == first

    # Download caches and lock files hold timestamps, not weights.
    (folder / ".cache").mkdir()
    (folder / ".cache" / "big.bin.metadata").write_text("1700000000.123")
    assert weights_fingerprint("sam", str(tmp_path / "a")) == first

    seen = {first}
    for path, offset in [
        (folder / "sub" / "small.safetensors", 1000),  # one byte of a small weight file
        (folder / "big.bin", EDGE_BYTES // 2),  # the middle of a large file's first MiB
        (folder / "big.bin", WHOLE_FILE_LIMIT + 1000),  # its last MiB
    ]:
        _flip(path, offset)
        seen.add(weights_fingerprint("sam", str(tmp_path / "a")))
    (folder / "sub" / "small.safetensors").rename(folder / "sub" / "other.safetensors")
    seen.add(weights_fingerprint("sam", str(tmp_path / "a")))
    assert len(seen) == 5


def test_fingerprint_of_hub_weights_names_the_pinned_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights_fingerprint reached for the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)  # no ultralytics asset in the working directory
    sam = MODELS["sam"]
    assert weights_fingerprint("sam", None) == f"hub:{sam.hub_id}@{sam.revision}"
    assert weights_fingerprint("sam", str(tmp_path)) == f"hub:{sam.hub_id}@{sam.revision}"  # no sam/ there
    assert weights_fingerprint("mobile-sam", None).startswith("hub:ultralytics/assets/mobile_sam.pt@v8.4.0")
    world = weights_fingerprint("yolo-world", None)
    assert world.startswith("hub:ultralytics/assets/yolov8s-worldv2.pt@v8.4.0")
    assert world.endswith(f";openai/clip-vit-base-patch32@{MODELS['yolo-world'].revision}")


def test_fingerprint_hashes_an_ultralytics_asset_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mobile_sam.pt").write_bytes(b"one checkpoint")
    one = weights_fingerprint("mobile-sam", None)
    (tmp_path / "mobile_sam.pt").write_bytes(b"another checkpoint")
    other = weights_fingerprint("mobile-sam", None)
    assert one.startswith("hub:ultralytics/assets/mobile_sam.pt@v8.4.0+sha256:") and one != other


def test_owlv2_shrinks_large_images_before_its_gaussian(tiny_models) -> None:
    """Photos >= 8x the model side are box-reduced first: close pixel values, exact box geometry."""
    from pathlib import Path

    import numpy as np
    import torch
    import ultralytics
    from PIL import Image

    from promptpaint.models import FAMILIES, load_model
    from promptpaint.models.owl import SHRINK_TO

    loaded = load_model("owlv2", str(tiny_models), torch.device("cpu"), torch.float32)
    backend = FAMILIES["owlv2"].backend(loaded, torch.device("cpu"), torch.float32)
    side = backend.side
    small = np.zeros((2 * SHRINK_TO * side - 1, 4 * SHRINK_TO * side, 3), np.uint8)
    assert backend._shrink(small)[0] is small  # under 2 x SHRINK_TO: untouched
    bus = np.asarray(Image.open(Path(ultralytics.__file__).parent / "assets" / "bus.jpg").convert("RGB"))
    odd = bus[:1077, :803]  # not a multiple of k: padded bottom/right
    h, w = odd.shape[:2]
    k = min(h, w) // (SHRINK_TO * side)
    assert k >= 2
    shrunk, (th, tw) = backend._shrink(odd)
    assert shrunk.shape[:2] == (-(-h // k), -(-w // k))
    assert th == tw == max(shrunk.shape[:2]) * k >= max(h, w)  # the padded square OWLv2's boxes are relative to
    ip = loaded.processor.image_processor
    padded = np.full((shrunk.shape[0] * k, shrunk.shape[1] * k, 3), 128, np.uint8)
    padded[:h, :w] = odd
    full = ip(images=[padded], return_tensors="pt")["pixel_values"]
    fast = ip(images=[shrunk], return_tensors="pt")["pixel_values"]
    levels = (full - fast).abs() * float(np.mean(ip.image_std)) * 255
    assert float(levels.mean()) < 2.0, float(levels.mean())
