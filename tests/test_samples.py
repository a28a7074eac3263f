"""make_photos: real photos from the bundled files, deterministic per seed, sizes in the asked range."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from promptpaint.samples import make_photos, photo_sources

pytestmark = pytest.mark.skipif(not photo_sources(), reason="no bundled photo installed")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_photos(tmp_path / "a", 6, megapixels=(0.05, 0.1), seed=3)
    b = make_photos(tmp_path / "b", 6, megapixels=(0.05, 0.1), seed=3)
    make_photos(tmp_path / "c", 6, megapixels=(0.05, 0.1), seed=4)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_sizes_in_range_mixed_formats_and_subfolders(tmp_path):
    paths = make_photos(tmp_path, 10, megapixels=(0.3, 1.0), seed=0)
    assert len(paths) == 10
    sizes = []
    for p in paths:
        with Image.open(p) as im:
            assert im.mode == "RGB"
            assert 0.3e6 <= im.width * im.height <= 1.0e6
            sizes.append(im.size)
    assert len(set(sizes)) >= 8  # mixed sizes and aspect ratios
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    assert {p.parent.name for p in paths} == {"a", "b"}


def test_cli_photos(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "promptpaint.samples",
        str(tmp_path),
        "-n",
        "3",
        "--photos",
        "--megapixels",
        "0.05",
        "0.1",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3
    for p in files:
        with Image.open(p) as im:
            assert 0.05e6 <= im.width * im.height <= 0.1e6
