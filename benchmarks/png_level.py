"""Which PNG compression level should the writer use? Encode time and size per zlib level, on real photos.

Encodes ~30 real photos (``make_photos``, 0.3-1 MP) and a typical blend mask for each (a few blobs,
feathered like ``mask.feather_px``, rounded up to uint8 as the writer does) with PIL's PNG encoder at
``compress_level`` 0..9 (``optimize=False``), and the photos as WebP lossless, WebP quality 90 and JPEG
quality 90. Times are CPU time of this process (encoders are single-threaded), so a busy machine
matters less; sizes are exact.

Prints one JSON line:
  images, megapixels_total
  photo.{png0..png9, webp_lossless, webp_q90, jpeg_q90}: ms per megapixel, bytes per megapixel,
                                                         size and time relative to PNG level 6
  mask.{png0..png9}: the same for the masks
  recommend_photo_level, recommend_mask_level: the level with the smallest time x size among those at
  most 10 % bigger than level 6 (the zlib default PIL uses)

Usage: python benchmarks/png_level.py [--n 30] [--megapixels 0.3 1.0] [--repeats 1]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptpaint.samples import make_photos

LEVELS = range(10)


def typical_mask(rng: np.random.Generator, w: int, h: int, feather: int = 4) -> np.ndarray:
    """A blend mask like the writer's: 1-3 blobs over 5-35 % of the image, feathered edges, ceil to uint8."""
    m = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(m)
    for _ in range(int(rng.integers(1, 4))):
        bw, bh = int(w * rng.uniform(0.15, 0.5)), int(h * rng.uniform(0.2, 0.6))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + bw, y + bh], fill=255)
        else:  # an irregular polygon, like a SAM outline
            k = int(rng.integers(6, 14))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = rng.uniform(0.6, 1.0, k)
            pts = [
                (x + bw / 2 * (1 + r * np.cos(a)), y + bh / 2 * (1 + r * np.sin(a)))
                for a, r in zip(ang, rad, strict=True)
            ]
            draw.polygon(pts, fill=255)
    blend = np.asarray(m.filter(ImageFilter.GaussianBlur(feather)), np.float32) / 255.0
    return np.ceil(blend * 255.0).clip(0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **params) -> tuple[float, int]:
    buf = io.BytesIO()
    t = time.process_time()
    im.save(buf, format=fmt, **params)
    return time.process_time() - t, buf.tell()


def measure(images: list[Image.Image], variants: dict[str, tuple[str, dict]], repeats: int) -> dict:
    mp = sum(im.width * im.height for im in images) / 1e6
    out = {}
    for name, (fmt, params) in variants.items():
        best_t, size = float("inf"), 0
        for _ in range(repeats):
            t_sum, size = 0.0, 0
            for im in images:
                t, b = encode(im, fmt, **params)
                t_sum, size = t_sum + t, size + b
            best_t = min(best_t, t_sum)
        out[name] = {"ms_per_mp": round(1000 * best_t / mp, 1), "bytes_per_mp": int(size / mp)}
    ref = out["png6"]
    for v in out.values():
        v["size_vs_png6"] = round(v["bytes_per_mp"] / ref["bytes_per_mp"], 3)
        v["time_vs_png6"] = round(v["ms_per_mp"] / ref["ms_per_mp"], 3)
    return out


def recommend(res: dict, max_growth: float = 1.10) -> int:
    ok = [lv for lv in LEVELS if lv > 0 and res[f"png{lv}"]["size_vs_png6"] <= max_growth]
    return min(ok, key=lambda lv: res[f"png{lv}"]["ms_per_mp"] * res[f"png{lv}"]["bytes_per_mp"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--megapixels", type=float, nargs=2, default=(0.3, 1.0), metavar=("MIN", "MAX"))
    ap.add_argument("--repeats", type=int, default=1, help="best of R timings per variant")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pp-pnglevel-"))
    try:
        paths = make_photos(work, args.n, megapixels=tuple(args.megapixels), seed=args.seed)
        photos = []
        for p in paths:
            with Image.open(p) as im:
                photos.append(im.convert("RGB"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    masks = [Image.fromarray(typical_mask(rng, im.width, im.height)) for im in photos]

    png = {f"png{lv}": ("PNG", {"compress_level": lv, "optimize": False}) for lv in LEVELS}
    photo = measure(
        photos,
        {
            **png,
            "webp_lossless": ("WEBP", {"lossless": True}),
            "webp_q90": ("WEBP", {"quality": 90}),
            "jpeg_q90": ("JPEG", {"quality": 90}),
        },
        args.repeats,
    )
    mask = measure(masks, png, args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "png_level",
                "images": len(photos),
                "megapixels_total": round(sum(im.width * im.height for im in photos) / 1e6, 2),
                "timing": "process CPU time",
                "photo": photo,
                "mask": mask,
                "recommend_photo_level": recommend(photo),
                "recommend_mask_level": recommend(mask),
            }
        )
    )


if __name__ == "__main__":
    main()
