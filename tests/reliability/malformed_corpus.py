"""A seeded corpus of what a real image folder contains: valid images in every mode and container the
decoder supports, and files that must become typed error rows (truncated, random, empty, bombs, lying
headers, wrong extensions, formats that are not allowed), under odd file names.

``build_corpus(folder, seed)`` writes the files and returns one :class:`Case` per file with what the
decoder must make of it. Everything is generated here with PIL/numpy/zlib; the same seed gives the same
bytes and names.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from promptpaint.io import ERROR_KINDS
from promptpaint.samples import synthetic_image

# Kinds a file's *content* can earn (io_error needs an unreadable file, not odd bytes).
CONTENT_KINDS = frozenset(ERROR_KINDS) - {"io_error"}
CUT_KINDS = frozenset({"truncated", "undecodable"})


@dataclass(frozen=True)
class Case:
    """One generated file and what decoding it must give.

    expect: "ok" (decodes to ``size``), "error" (a DecodeError whose kind is in ``kinds``), or
    "ok_or_error" (either; when it decodes it must still have ``size`` if one is given).
    """

    path: str
    category: str
    expect: str
    kinds: frozenset[str] = CONTENT_KINDS
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation
    alpha: bool | None = None  # whether the decode must carry an alpha channel (None: not checked)
    rgb_sha256: str | None = None  # exact pixels, for lossless sources
    valid: bool = field(default=False)  # a well-formed image (the job should run models on it)


# ------------------------------------------------------------------------------------------ encoders


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).hexdigest()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunk(png: bytes, chunk: bytes, after_ihdr: bool = True) -> bytes:
    """Insert a chunk after IHDR (or before IEND)."""
    at = 8 + 25 if after_ihdr else len(png) - 12
    return png[:at] + chunk + png[at:]


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    out = bytearray(png)
    out[16:24] = struct.pack(">II", width, height)
    out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def png_zero_bomb(width: int, height: int) -> bytes:
    """A real grayscale PNG of zeros: ~0.1% of its pixel count on disk, all of it if decoded."""
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def exif_orientation_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def huge_exif_block(n_bytes: int) -> bytes:
    """A well-formed little-endian TIFF/EXIF block holding one UserComment of ``n_bytes``."""
    header = b"II*\x00" + struct.pack("<I", 8)
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x9286, 7, n_bytes, 8 + 2 + 12 + 4) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + header + ifd + b"A" * n_bytes


def many_entry_exif(n_entries: int) -> bytes:
    """A TIFF IFD with ``n_entries`` entries (each pointing past the end): stresses EXIF parsing."""
    header = b"II*\x00" + struct.pack("<I", 8)
    entries = b"".join(struct.pack("<HHII", 0x1000 + i, 2, 64, 0xFFFFFF00) for i in range(n_entries))
    return header + struct.pack("<H", n_entries) + entries + struct.pack("<I", 0)


# ----------------------------------------------------------------------------------------- the corpus


class _Gen:
    def __init__(self, folder: Path, seed: int):
        self.folder = folder
        self.rng = np.random.default_rng(seed)
        self.cases: list[Case] = []
        self.n = 0

    # helpers ----------------------------------------------------------------------------------------
    def size(self) -> tuple[int, int]:
        return int(self.rng.integers(64, 129)), int(self.rng.integers(48, 97))

    def scene(self, size: tuple[int, int] | None = None) -> Image.Image:
        return synthetic_image(self.rng, *(size or self.size()))

    def write(self, category: str, ext: str, data: bytes, name: str | bytes | None = None, **case: object) -> None:
        self.n += 1
        if name is None:
            name = f"{self.n:04d}_{category}.{ext}"
        folder = os.fsencode(self.folder)
        raw = os.path.join(folder, name if isinstance(name, bytes) else os.fsencode(name))
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        with open(raw, "wb") as f:
            f.write(data)
        self.cases.append(Case(path=os.fsdecode(raw), category=category, **case))  # type: ignore[arg-type]

    def ok(self, category: str, ext: str, data: bytes, size: tuple[int, int], **kw: object) -> None:
        self.write(category, ext, data, expect="ok", size=size, valid=True, **kw)

    def valid_file(self) -> tuple[bytes, str, tuple[int, int]]:
        """A random well-formed file in one of the allowed containers (source for cuts and flips)."""
        im = self.scene()
        fmt = str(self.rng.choice(["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]))
        params: dict[str, object] = {"TIFF": {"compression": "tiff_lzw"}, "JPEG": {"quality": 90}}.get(fmt, {})
        ext = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
        return encode(im, fmt, **params), ext, im.size


def _valid(g: _Gen) -> Iterator[None]:
    """~330 well-formed images: every mode and container, EXIF variants, wrong extensions, tiny sizes."""
    for _ in range(60):
        im = g.scene()
        g.ok("jpeg", "jpg", encode(im, "JPEG", quality=int(g.rng.integers(50, 96))), im.size, alpha=False)
    for _ in range(40):
        im = g.scene()
        g.ok("png_rgb", "png", encode(im, "PNG"), im.size, alpha=False, rgb_sha256=sha(np.asarray(im)))
    for _ in range(12):
        im = g.scene()
        lossless = bool(g.rng.random() < 0.5)
        g.ok(
            "webp",
            "webp",
            encode(im, "WEBP", lossless=lossless),
            im.size,
            rgb_sha256=sha(np.asarray(im)) if lossless else None,
        )
    for _ in range(8):
        im = g.scene()
        g.ok("bmp", "bmp", encode(im, "BMP"), im.size, alpha=False, rgb_sha256=sha(np.asarray(im)))
    for _ in range(12):
        im = g.scene()
        g.ok("jpeg_progressive", "jpeg", encode(im, "JPEG", progressive=True, quality=85), im.size, alpha=False)
    for _ in range(15):
        im = g.scene()
        g.ok("cmyk_jpeg", "jpg", encode(im.convert("CMYK"), "JPEG", quality=90), im.size, alpha=False)
    for _ in range(10):
        im = g.scene()
        g.ok("gray_jpeg", "jpg", encode(im.convert("L"), "JPEG"), im.size, alpha=False)
    for _ in range(15):
        w, h = g.size()
        arr = g.rng.integers(0, 65536, (h, w), dtype=np.uint16)
        expected = np.repeat((arr >> 8).astype(np.uint8)[..., None], 3, axis=2)
        g.ok("png_16bit", "png", encode(Image.fromarray(arr), "PNG"), (w, h), alpha=False, rgb_sha256=sha(expected))
    for _ in range(8):
        w, h = g.size()
        arr = g.rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
        # 48-bit RGB PNG: Pillow reads it as 8-bit RGB (its own down-conversion); only the size is pinned.
        data = _png_rgb48(arr)
        g.ok("png_48bit", "png", data, (w, h), alpha=False)
    for _ in range(15):
        im = g.scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        g.ok("palette_trns_png", "png", encode(im, "PNG", transparency=0), im.size, alpha=True)
    for _ in range(10):
        im = g.scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        g.ok("palette_trns_gif", "gif", encode(im, "GIF", transparency=0), im.size, alpha=True)
    for _ in range(10):
        im = g.scene().convert("LA")
        g.ok("la_png", "png", encode(im, "PNG"), im.size, alpha=True)
    for _ in range(10):
        im = g.scene().convert("RGBA")
        im.putalpha(Image.fromarray(g.rng.integers(0, 256, im.size[::-1], dtype=np.uint8)))
        g.ok("rgba_png", "png", encode(im, "PNG"), im.size, alpha=True, rgb_sha256=sha(np.asarray(im)[..., :3]))
    for _ in range(8):
        im = g.scene().convert("1")
        g.ok("bilevel_png", "png", encode(im, "PNG"), im.size, alpha=False)
    for _ in range(8):
        w, h = g.size()
        arr = g.rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32)
        g.ok("mode_i_tiff", "tif", encode(Image.fromarray(arr, mode="I"), "TIFF"), (w, h), alpha=False)
    for _ in range(8):
        w, h = g.size()
        arr = g.rng.normal(128, 200, (h, w)).astype(np.float32)
        arr[0, 0], arr[-1, -1] = np.nan, np.inf  # real float rasters carry these
        g.ok("mode_f_tiff", "tiff", encode(Image.fromarray(arr, mode="F"), "TIFF"), (w, h), alpha=False)
    for _ in range(12):
        frames = [g.scene() for _ in range(3)]
        frames = [f.resize(frames[0].size) for f in frames]
        data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
        g.ok("animated_gif", "gif", data, frames[0].size)
    for _ in range(12):
        pages = [g.scene() for _ in range(3)]  # pages of different sizes: frame 0 decides
        g.ok("multipage_tiff", "tiff", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), pages[0].size)
    for orientation in range(1, 9):
        for _ in range(3):
            im = g.scene()
            size = im.size if orientation < 5 else im.size[::-1]
            data = encode(im, "JPEG", exif=exif_orientation_block(orientation))
            g.ok(f"exif_orientation_{orientation}", "jpg", data, size, alpha=False)
    for _ in range(12):
        im = g.scene()
        junk = (
            b"Exif\x00\x00" + bytes(g.rng.choice([b"II*\x00", b"MM\x00*"])) + g.rng.bytes(int(g.rng.integers(4, 600)))
        )
        g.ok("broken_exif", "jpg", jpeg_with_app1(encode(im, "JPEG"), junk), im.size, alpha=False)
    for _ in range(6):
        im = g.scene()
        data = jpeg_with_app1(encode(im, "JPEG"), huge_exif_block(65_000))  # APP1 maximum is 65 533 bytes
        g.ok("huge_exif_jpeg", "jpg", data, im.size, alpha=False)
    for _ in range(6):
        im = g.scene()
        png = encode(im, "PNG")
        data = png_with_chunk(png, png_chunk(b"eXIf", many_entry_exif(20_000)))  # ~240 kB of IFD entries
        g.ok("huge_exif_png", "png", data, im.size, alpha=False, rgb_sha256=sha(np.asarray(im)))
    for src_fmt, ext in (
        ("PNG", "jpg"),
        ("JPEG", "png"),
        ("WEBP", "gif"),
        ("BMP", "tiff"),
        ("GIF", "webp"),
        ("TIFF", "jpeg"),
    ):
        for _ in range(4):
            im = g.scene()
            g.ok("wrong_extension", ext, encode(im, src_fmt), im.size)
    for size in ((1, 1), (2, 2), (1, 300), (300, 1), (8, 8), (7, 500), (640, 4)):
        im = Image.new("RGB", size, tuple(int(v) for v in g.rng.integers(0, 256, 3)))
        g.ok("tiny_or_thin", "png", encode(im, "PNG"), size, alpha=False, rgb_sha256=sha(np.asarray(im)))
    for ext in ("JPG", "Png", "JPEG", "TiF", "WEBP"):
        im = g.scene()
        fmt = {"JPG": "JPEG", "Png": "PNG", "JPEG": "JPEG", "TiF": "TIFF", "WEBP": "WEBP"}[ext]
        g.ok("upper_extension", ext, encode(im, fmt), im.size)
    yield


def _png_rgb48(arr: np.ndarray) -> bytes:
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


ODD_NAMES: tuple[str | bytes, ...] = (
    "with space.jpg",
    "  leading and trailing spaces  .jpg",
    "ünïcödé café.jpg",
    "emoji 🎨🖼️.png",
    "日本語の写真.jpg",
    "עברית-rtl.png",
    "e\u0301-decomposed.jpg",  # NFD: the same-looking name as a composed é is a different file
    "-starts-with-dash.jpg",
    "#hash%20percent&amp;.jpg",
    "glob[chars]*?.png",
    "double::colon.jpg",  # fsspec reads "a::b" as a URL chain
    "proto:like.jpg",
    "back\\slash.jpg",
    "new\nline.png",
    "tab\there.jpg",
    "quote'\"s.jpg",
    "~tilde.jpg",
    "é" * 120 + ".jpg",  # 244 bytes in UTF-8: close to the 255-byte name limit
    "x" * 250 + ".png",
    "sub dir ü/nested/deep name.jpg",
    b"latin1-\xe9t\xe9.jpg",  # not UTF-8: Python sees surrogate escapes
    b"invalid-\xff\xfe-bytes.png",
)


def _odd_names(g: _Gen) -> Iterator[None]:
    for name in ODD_NAMES:
        im = g.scene()
        is_png = name.endswith(b".png") if isinstance(name, bytes) else name.endswith(".png")
        data = encode(im, "PNG" if is_png else "JPEG")
        g.write("odd_name", "", data, name=name, expect="ok", size=im.size, valid=True)
    yield


def _broken(g: _Gen) -> Iterator[None]:
    """~700 files that must become typed error rows (or, where noted, may still decode)."""
    for _ in range(300):  # cut at a random offset: what an interrupted copy leaves
        data, ext, size = g.valid_file()
        cut = int(g.rng.integers(1, len(data)))
        # The tail after the pixel data (PNG IEND, GIF trailer, TIFF IFD padding) is optional to
        # some decoders, so a cut very near the end may still decode; it must then be the right size.
        g.write("truncated", ext, data[:cut], expect="ok_or_error", kinds=CUT_KINDS, size=size)
    for _ in range(100):
        ext = str(g.rng.choice(["jpg", "png", "gif", "webp", "tif", "bmp"]))
        g.write("random_bytes", ext, g.rng.bytes(int(g.rng.integers(1, 8192))), expect="error")
    magics = {
        "png": b"\x89PNG\r\n\x1a\n",
        "jpg": b"\xff\xd8\xff\xe0",
        "gif": b"GIF89a",
        "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ",
        "tif": b"II*\x00",
        "bmp": b"BM",
    }
    for _ in range(100):  # a real magic number, then junk: gets past format sniffing
        ext = str(g.rng.choice(list(magics)))
        data = magics[ext] + g.rng.bytes(int(g.rng.integers(0, 4096)))
        g.write("magic_then_junk", ext, data, expect="ok_or_error")
    for _ in range(60):  # a few bytes overwritten inside a valid file
        data, ext, size = g.valid_file()
        buf = bytearray(data)
        for _ in range(int(g.rng.integers(1, 9))):
            buf[int(g.rng.integers(0, len(buf)))] = int(g.rng.integers(0, 256))
        g.write("flipped_bytes", ext, bytes(buf), expect="ok_or_error")
    for i in range(20):
        g.write(
            "zero_bytes", ["jpg", "png", "gif", "webp", "tif"][i % 5], b"", expect="error", kinds=frozenset({"empty"})
        )
    for _ in range(10):
        g.write(
            "null_filled",
            "jpg",
            b"\0" * int(g.rng.integers(1, 100_000)),
            expect="error",
            kinds=frozenset({"undecodable"}),
        )
    for i in range(15):  # text, HTML, PDF, zip and a shell script under image names
        blob = [
            b"hello world\n" * 50,
            b"<!doctype html><html><body>404</body></html>",
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
            b"PK\x03\x04" + bytes(40),
            b"#!/bin/sh\nrm -rf /\n",
        ][i % 5]
        g.write("not_an_image", ["jpg", "png", "jpeg"][i % 3], blob, expect="error", kinds=frozenset({"undecodable"}))
    for i in range(20):  # Pillow reads these, the spec does not allow them
        im = g.scene((32, 32))
        fmt, ext = [("ICO", "png"), ("PPM", "jpg"), ("TGA", "png"), ("PCX", "jpg"), ("SGI", "png")][i % 5]
        g.write("format_not_allowed", ext, encode(im, fmt), expect="error", kinds=frozenset({"unsupported_format"}))
    yield from _bombs(g)


def _bombs(g: _Gen) -> Iterator[None]:
    too_large = frozenset({"too_large"})
    base_png = encode(Image.new("RGB", (8, 8)), "PNG")
    for w, h in ((60_000, 60_000), (100_000, 1_000), (8_000, 8_000), (2**31 - 1, 2**31 - 1), (7_000, 7_000)):
        g.write("header_claims_huge", "png", patch_png_size(base_png, w, h), expect="error", kinds=too_large)
    for w, h in ((8_000, 8_000), (20_000, 3_000)):  # real zlib bombs: ~64 MB of pixels in ~60 kB
        g.write("png_zlib_bomb", "png", png_zero_bomb(w, h), expect="error", kinds=too_large)
    for _ in range(3):
        im = Image.new("L", (7_000, 7_000))  # TIFF deflate bomb (49 Mpx > limits.max_pixels)
        g.write(
            "tiff_deflate_bomb",
            "tif",
            encode(im, "TIFF", compression="tiff_adobe_deflate"),
            expect="error",
            kinds=too_large,
        )
    gif = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65_535, 65_535)  # logical screen 65535 x 65535
    g.write("header_claims_huge", "gif", bytes(gif), expect="error", kinds=too_large)
    bmp = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 50_000, 50_000)
    g.write("header_claims_huge", "bmp", bytes(bmp), expect="error", kinds=too_large | CUT_KINDS)
    jpeg = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65_500, 65_500)
    g.write("header_claims_huge", "jpg", bytes(jpeg), expect="error", kinds=too_large)
    tif = encode(Image.new("L", (4, 4)), "TIFF")
    g.write(
        "header_claims_huge",
        "tif",
        _patch_tiff_size(tif, 200_000, 200_000),
        expect="error",
        kinds=too_large | CUT_KINDS,
    )
    webp = bytearray(encode(Image.new("RGB", (16, 16)), "WEBP", lossless=True))
    # Lossless VP8L header: 14-bit width-1 and height-1 right after the 0x2f signature byte.
    at = webp.index(b"VP8L") + 8
    bits = int.from_bytes(webp[at + 1 : at + 5], "little")
    bits = (bits & ~0xFFFFFFF) | 16383 | (16383 << 14)
    webp[at + 1 : at + 5] = bits.to_bytes(4, "little")
    g.write("header_claims_huge", "webp", bytes(webp), expect="error", kinds=too_large | CUT_KINDS)
    for _ in range(3):  # PNG text chunk that inflates to 64 MB (Pillow caps text chunks)
        im = g.scene()
        text = b"Comment\x00\x00" + zlib.compress(b"\0" * 64 * 2**20, 9)
        data = png_with_chunk(encode(im, "PNG"), png_chunk(b"zTXt", text))
        g.write("png_text_bomb", "png", data, expect="ok_or_error", size=im.size)
    for _ in range(3):
        im = g.scene()
        icc = b"icc\x00\x00" + zlib.compress(b"\0" * 64 * 2**20, 9)
        data = png_with_chunk(encode(im, "PNG"), png_chunk(b"iCCP", icc))
        g.write("png_icc_bomb", "png", data, expect="ok_or_error", size=im.size)
    yield


def _patch_tiff_size(tif: bytes, width: int, height: int) -> bytes:
    out = bytearray(tif)
    order = "<" if out[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", out[4:8])[0]
    (count,) = struct.unpack(order + "H", out[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack(order + "HH", out[at : at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength -> force LONG
            out[at + 2 : at + 12] = struct.pack(order + "HII", 4, 1, width if tag == 256 else height)
    return bytes(out)


SECTIONS: tuple[Callable[[_Gen], Iterator[None]], ...] = (_valid, _odd_names, _broken)


def build_corpus(folder: str | Path, seed: int = 20240611) -> list[Case]:
    """Write the corpus into ``folder`` (created) and return its cases, one per file."""
    g = _Gen(Path(folder), seed)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for section in SECTIONS:
        for _ in section(g):
            pass
    return g.cases
