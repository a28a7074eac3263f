"""Synthetic sample images for the offline demo, the tests and the benchmarks (no downloads).

Each image is a gradient "scene" with a few coloured shapes standing in for objects, saved as JPEG
or PNG; ``broken=True`` adds inputs a real corpus contains: a truncated JPEG, an empty file and a
text file named ``.jpg``.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("-n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--broken", action="store_true", help="add a truncated JPEG, an empty file and a text file")
    args = ap.parse_args()
    paths = make_samples(args.folder, args.n, seed=args.seed, broken=args.broken)
    print(f"wrote {len(paths)} files to {args.folder}")


if __name__ == "__main__":
    main()
