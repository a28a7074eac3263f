"""Sample images for the offline demo, the tests and the benchmarks (no downloads).

``make_samples``: each image is a gradient "scene" with a few coloured shapes standing in for objects,
saved as JPEG or PNG; ``broken=True`` adds inputs a real corpus contains: a truncated JPEG, an empty file
and a text file named ``.jpg``.

``make_photos``: real photographs at real sizes, cut from the photos that ship inside installed packages
(ultralytics' ``bus.jpg`` and ``zidane.jpg``, matplotlib's ``grace_hopper.jpg``): random crops, resized
to a random area in a megapixel range, flipped, saved as JPEG (every 5th as PNG) in subfolders.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth two-colour gradient with 1-3 ellipses/rectangles on it."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    base = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(base, (height, width, 3)).copy())
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=fill)
    return img


def make_samples(
    folder: str | Path,
    n: int = 12,
    size: tuple[int, int] = (256, 192),
    seed: int = 0,
    broken: bool = False,
) -> list[Path]:
    """Write ``n`` synthetic images (alternating JPEG/PNG) into ``folder``; returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = synthetic_image(rng, *size)
        p = out / (f"sample_{i:04d}.jpg" if i % 2 == 0 else f"sample_{i:04d}.png")
        img.save(p, quality=92) if p.suffix == ".jpg" else img.save(p)
        paths.append(p)
    if broken:
        good = paths[0].read_bytes()
        (out / "broken_truncated.jpg").write_bytes(good[: len(good) // 2])
        (out / "broken_empty.png").write_bytes(b"")
        (out / "broken_text.jpg").write_text("this is not an image\n")
        paths += [out / "broken_truncated.jpg", out / "broken_empty.png", out / "broken_text.jpg"]
    return paths


# (package, path inside the package) of real photographs that ship with installed packages.
PHOTO_SOURCES = (
    ("ultralytics", "assets/bus.jpg"),
    ("ultralytics", "assets/zidane.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def photo_sources() -> list[Path]:
    """Paths of the bundled photographs that are installed here (a missing package or file is skipped)."""
    found = []
    for package, rel in PHOTO_SOURCES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            p = Path(root) / rel
            if p.is_file():
                found.append(p)
                break
    return found


def _fit_area(aspect: float, area: float, lo: float, hi: float) -> tuple[int, int]:
    """(width, height) with ``width / height`` close to ``aspect`` and ``lo <= width * height <= hi``."""
    w = max(1, round(math.sqrt(area * aspect)))
    h = max(1, round(w / aspect))
    while w * h > hi:  # rounding overshoot: trim the longer side
        if w >= h:
            w -= 1
        else:
            h -= 1
    while w * h < lo:
        if w <= h:
            w += 1
        else:
            h += 1
    return w, h


def make_photos(
    folder: str | Path,
    n: int,
    megapixels: tuple[float, float] = (0.3, 1.0),
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` real photographs of ``megapixels`` (min, max) into subfolders of ``folder``.

    Each is a random crop (at least half of each side) of a random bundled photo, resized with LANCZOS to
    a random area in the range at the crop's aspect ratio, flipped left-right half the time, and saved as
    JPEG quality 90 (every 5th as PNG) under ``a/`` or ``b/``. The same seed writes the same bytes.
    """
    sources = photo_sources()
    if not sources:
        raise RuntimeError(f"none of the bundled photos is installed: {PHOTO_SOURCES}")
    lo, hi = sorted(float(m) * 1e6 for m in megapixels)
    if lo < 1:
        raise ValueError(f"megapixels must be positive, got {megapixels}")
    originals = []
    for p in sources:
        with Image.open(p) as im:
            originals.append(im.convert("RGB"))
    out = Path(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        src = originals[int(rng.integers(len(originals)))]
        sw, sh = src.size
        cw = int(round(sw * rng.uniform(0.5, 1.0)))
        ch = int(round(sh * rng.uniform(0.5, 1.0)))
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        w, h = _fit_area(cw / ch, rng.uniform(lo, hi), lo, hi)
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.LANCZOS)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        sub = out / ("a" if i % 2 == 0 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        if i % 5 == 4:
            p = sub / f"photo_{i:04d}.png"
            img.save(p)
        else:
            p = sub / f"photo_{i:04d}.jpg"
            img.save(p, quality=90)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("-n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--broken", action="store_true", help="add a truncated JPEG, an empty file and a text file")
    ap.add_argument("--photos", action="store_true", help="real photographs (bundled photos, cropped and resized)")
    ap.add_argument(
        "--megapixels", type=float, nargs=2, default=(0.3, 1.0), metavar=("MIN", "MAX"), help="with --photos"
    )
    args = ap.parse_args()
    if args.photos:
        if args.broken:
            ap.error("--broken goes with synthetic samples, not --photos")
        paths = make_photos(args.folder, args.n, megapixels=tuple(args.megapixels), seed=args.seed)
    else:
        paths = make_samples(args.folder, args.n, seed=args.seed, broken=args.broken)
    print(f"wrote {len(paths)} files to {args.folder}")


if __name__ == "__main__":
    main()
