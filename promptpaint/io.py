"""Image I/O for promptpaint: bounded decoding, PNG encoding, fsspec helpers and content ids.

Everything that touches untrusted bytes goes through :func:`decode_image`, which never raises anything
but :class:`DecodeError`, so a pipeline can record one bad file and carry on with the corpus.

Storage helpers accept local paths and fsspec URIs (``file://``, ``s3://``, ``gs://``, ``memory://``).
Remote backends (s3fs, gcsfs) are only imported by fsspec when such a URI is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import struct
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from xml.sax.saxutils import quoteattr, unescape

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

__all__ = [
    "ERROR_KINDS",
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "Decoded",
    "atomic_write",
    "content_id",
    "decode_image",
    "encode_mask_png",
    "encode_png",
    "exists",
    "expand_input",
    "iter_inputs",
    "join",
    "read_bytes",
    "read_png_text",
    "remove_temp_files",
]

ERROR_KINDS = ("undecodable", "truncated", "too_large", "unsupported_format", "empty", "io_error")

# zlib levels chosen by measurement (benchmarks/png_level.py, RESULTS.md): for photos level 1 is 3.6x faster
# than Pillow's default 6 for 10 % more bytes; masks (flat areas) compress 39 % worse at 1, and 5 costs them
# ~6 ms per megapixel.
PNG_LEVEL = 1
MASK_PNG_LEVEL = 5
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "mpo")

# Phrases Pillow (and the codecs under it) use when the data simply ran out. Pillow has no dedicated
# exception type for this, so matching the message is the only way to tell truncation from corruption.
# "cannot load this image" is a JPEG whose headers end before any scan data. Deliberately absent:
# "broken data stream" / "unrecognized data stream contents" -- Pillow 13 raises those for corrupt
# compressed data (e.g. flipped bytes in a PNG IDAT), never for a file that is merely cut short.
_TRUNCATION_RE = re.compile(
    r"truncat|premature end|end of file|cannot load this image",
    re.IGNORECASE,
)

# Backends where a "folder" is only a key prefix: makedirs is pointless there and on s3fs it may even try
# to create a bucket.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})

_ORIENTATION_TAG = ExifTags.Base.Orientation


class DecodeError(Exception):
    """A file that cannot become an image; ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown DecodeError kind {kind!r}; expected one of {ERROR_KINDS}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep (kind, message) across pickling, e.g. when Ray ships the exception between processes.
        return (type(self), (self.kind, self.message))


@dataclass
class Decoded:
    """A decoded image.

    ``rgb``: (H, W, 3) uint8, C-contiguous, writable, EXIF orientation applied.
    ``alpha``: (H, W) uint8 when the source had transparency (RGBA, LA, PA, or a ``transparency`` entry
    for P/L/RGB/I;16), else None.
    ``format``: the PIL format name, e.g. "JPEG". ``mode``: the source PIL mode before conversion.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str
    mode: str


# --------------------------------------------------------------------------------------------- decode


def decode_image(data: bytes, *, max_pixels: int, formats: Sequence[str], max_bytes: int = 200 * 2**20) -> Decoded:
    """Decode ``data`` into RGB (+ alpha) uint8 arrays, enforcing size and format limits.

    Frame 0 is used for multi-frame files. The pixel limit is checked from the header before any pixel
    data is decoded, so decompression bombs cost microseconds. Raises only :class:`DecodeError`.
    """
    if not data:
        raise DecodeError("empty", "the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"the file is {len(data)} bytes, over limits.max_bytes={max_bytes}; raise it")
    try:
        return _decode(data, max_pixels=max_pixels, formats=formats)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("too_large", "ran out of memory while decoding; lower limits.max_pixels") from None
    except Exception as e:  # the contract is "only DecodeError escapes"
        raise DecodeError(_failure_kind(e, data), f"cannot decode image: {type(e).__name__}: {e}") from e


def _decode(data: bytes, *, max_pixels: int, formats: Sequence[str]) -> Decoded:
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; make it an error for this call only.
    # (Before Python 3.14 the filter list is process-wide, so another thread may briefly see this filter
    # or lose it; harmless, because _check_pixels enforces max_pixels on its own.)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = _open(data)
        with im:
            _check_format(im, formats)
            _check_pixels(im, max_pixels)
            _load(im, data)
            source_mode = im.mode
            fmt = str(im.format)
            im = _apply_orientation(im)
            rgb, alpha = _to_arrays(im)
    return Decoded(rgb=rgb, alpha=alpha, format=fmt, mode=source_mode)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(BytesIO(data))
    except UnidentifiedImageError:
        if _container_truncated(data):
            raise DecodeError("truncated", "the file ends before its image header does") from None
        raise DecodeError(
            "undecodable",
            "Pillow cannot identify an image in these bytes (unknown type or unreadable header)",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(
            "too_large",
            f"{e} Pillow's decompression-bomb guard (PIL.Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS}) rejects this even if limits.max_pixels is higher",
        ) from None


def _check_format(im: Image.Image, formats: Sequence[str]) -> None:
    allowed = {f.upper() for f in formats}
    if (im.format or "").upper() not in allowed:
        raise DecodeError(
            "unsupported_format",
            f"format {im.format} is not allowed (allowed: {', '.join(sorted(allowed))}); add it to limits.formats",
        )


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise DecodeError(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds limits.max_pixels={max_pixels}; "
            "raise limits.max_pixels",
        )


def _load(im: Image.Image, data: bytes) -> None:
    try:
        im.load()
    except Exception as e:  # classified below, never leaked
        raise DecodeError(_failure_kind(e, data), f"cannot decode pixel data: {type(e).__name__}: {e}") from e


def _failure_kind(e: BaseException, data: bytes) -> str:
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "too_large"
    if isinstance(e, EOFError | struct.error) or _TRUNCATION_RE.search(str(e)):
        return "truncated"
    # WebP (libwebp only says "could not create decoder object") and TIFF (IFD written after the strips)
    # fail generically when cut short; their container headers tell us the real length.
    return "truncated" if _container_truncated(data) else "undecodable"


def _container_truncated(data: bytes) -> bool:
    """True when a RIFF (WebP) or TIFF header points past the end of ``data``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    if len(data) >= 8 and data[:4] in (b"II*\0", b"MM\0*"):
        order = "<" if data[:2] == b"II" else ">"
        return struct.unpack(order + "I", data[4:8])[0] >= len(data)
    return False


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip per EXIF; broken EXIF leaves the image as stored rather than failing the file."""
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(im)
    except Exception:  # EXIF in the wild is frequently malformed
        pass
    return im


def _to_arrays(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert any PIL mode to ((H, W, 3) uint8, (H, W) uint8 | None)."""
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        return _from_high_bit_depth(im)
    if mode == "F":
        gray = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        return _gray_to_rgb(np.clip(np.rint(gray), 0, 255).astype(np.uint8)), None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = np.asarray(_convert(im, "RGBA"))
        return _owned(rgba[..., :3]), _owned(rgba[..., 3])
    return _owned(np.asarray(_convert(im, "RGB"))), None


def _from_high_bit_depth(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    # 16-bit sources (PNG, TIFF -> "I;16"; PGM -> "I"): keep the high byte so the full range maps onto
    # 0..255 instead of clipping everything above 255 to white.
    values = np.asarray(im).astype(np.int64)
    gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    alpha = None
    transparency = im.info.get("transparency")
    if isinstance(transparency, int):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
    return _gray_to_rgb(gray), alpha


def _convert(im: Image.Image, mode: str) -> Image.Image:
    try:
        return im.convert(mode)
    except ValueError as e:
        raise DecodeError("undecodable", f"pixel mode {im.mode} cannot be converted to {mode}: {e}") from e


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return _owned(np.repeat(gray[..., None], 3, axis=2))


def _owned(a: np.ndarray) -> np.ndarray:
    # np.asarray(PIL image) is a read-only view in Pillow 13; callers get their own writable copy.
    return np.require(a, dtype=np.uint8, requirements=["C", "W", "O"])


# --------------------------------------------------------------------------------------------- encode


def encode_png(
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    text: Mapping[str, str] | None = None,
    compress_level: int = PNG_LEVEL,
) -> bytes:
    """Encode ``rgb`` (H, W, 3) uint8 (+ ``alpha`` (H, W) uint8 -> RGBA) as PNG bytes.

    ``text`` becomes tEXt chunks (iTXt when a value is not Latin-1); read it back with :func:`read_png_text`.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    pixels = rgb
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != rgb.shape[:2] or alpha.dtype != np.uint8:
            raise ValueError(f"alpha must be {rgb.shape[:2]} uint8, got {alpha.shape} {alpha.dtype}")
        pixels = np.dstack([rgb, alpha])
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    return _save_png(Image.fromarray(np.ascontiguousarray(pixels)), pnginfo=info, compress_level=compress_level)


XMP_KEY = "promptpaint:lineage"


def encode_image(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    text: Mapping[str, str],
    fmt: str = "png",
    quality: int = 95,
    lossless: bool = True,
    compress_level: int = PNG_LEVEL,
) -> bytes:
    """Encode an edited image as ``fmt`` (png | webp | jpeg) with its lineage ``text``.

    PNG keeps ``text`` as text chunks; WebP and JPEG carry it as JSON in an XMP packet (``read_image_text``
    reads either). JPEG has no alpha channel: it is dropped.
    """
    if fmt == "png":
        return encode_png(rgb, alpha, text, compress_level)
    rgb = np.asarray(rgb)
    pixels = np.dstack([rgb, alpha]) if (alpha is not None and fmt == "webp") else rgb
    im = Image.fromarray(np.ascontiguousarray(pixels))
    blob = json.dumps(dict(text), sort_keys=True)
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:promptpaint="https://github.com/promptpaint/ns/1.0/" '
        f"promptpaint:lineage={quoteattr(blob)}/></rdf:RDF></x:xmpmeta>"
    ).encode()
    buf = BytesIO()
    if fmt == "webp":
        im.save(buf, format="WEBP", lossless=lossless, quality=100 if lossless else quality, xmp=xmp, exact=True)
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality, xmp=xmp)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use png, webp or jpeg")
    return buf.getvalue()


def read_image_text(data: bytes) -> dict[str, str]:
    """The lineage text of an image written by ``encode_image``: PNG text chunks, or the XMP JSON of WebP/JPEG."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return read_png_text(data)
    with Image.open(BytesIO(data)) as im:
        xmp = im.info.get("xmp", b"")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    m = re.search(rb'promptpaint:lineage=(["\'])(.*?)\1', xmp, re.S)
    if not m:
        return {}
    return json.loads(unescape(m.group(2).decode("utf-8"), {"&quot;": '"', "&apos;": "'"}))


IMAGE_SUFFIX = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}


def input_root(uri_or_glob: str) -> str:
    """The folder output names are relative to: a folder input itself, a glob's literal prefix, a file's parent.

    In the same form as ``expand_input``'s paths (absolute locally, ``scheme://`` otherwise).
    """
    fs, path = fsspec.core.url_to_fs(uri_or_glob)
    if _is_glob(uri_or_glob):
        parts = path.split("/")
        root = "/".join(parts[: next(i for i, part in enumerate(parts) if _is_glob(part))])
    elif fs.isdir(path):
        root = path.rstrip("/")
    else:
        root = posixpath.dirname(path.rstrip("/"))
    return _with_scheme(uri_or_glob, fs, root or "/")


def output_names(paths: Sequence[str], root: str) -> dict[str, str]:
    """Input path -> output name: the path relative to ``root`` without its extension (``cars/0001``).

    Inputs whose names collide without their extensions (``a.jpg`` and ``a.png``) keep them (``a.jpg``,
    ``a.png``), whatever order they are listed in. A path outside ``root`` keeps only its file name.
    """
    prefix = root.rstrip("/") + "/"
    rel = {p: (p[len(prefix) :] if p.startswith(prefix) else posixpath.basename(p)) for p in paths}
    stems: dict[str, int] = {}
    for r in rel.values():
        stem = posixpath.splitext(r)[0]
        stems[stem] = stems.get(stem, 0) + 1
    out = {}
    for p, r in rel.items():
        stem = posixpath.splitext(r)[0]
        out[p] = _fit_name(r if stems[stem] > 1 or not stem else stem)
    return out


# A file name may hold 255 bytes; ours add an extension and atomic_write's ".<name>.tmp-<32 hex>".
_MAX_NAME_BYTES = 180


def _fit_name(name: str) -> str:
    """``name`` as a safe output name: "::" (fsspec's URL chaining) percent-encoded, an over-long last
    component cut to a prefix plus a hash of the whole (deterministic)."""
    name = name.replace("::", "%3A%3A")
    folder, base = posixpath.split(name)
    raw = base.encode("utf-8", "surrogateescape")
    if len(raw) <= _MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    short = raw[: _MAX_NAME_BYTES - 13].decode("utf-8", "ignore")
    return posixpath.join(folder, f"{short}~{digest}")


def encode_mask_png(mask: np.ndarray, compress_level: int = MASK_PNG_LEVEL) -> bytes:
    """Encode a (H, W) mask as grayscale PNG: bool -> 8-bit 0/255, uint8 -> 8-bit, uint16 -> 16-bit (label maps)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"mask must be bool, uint8 or uint16, got {mask.dtype}")
    return _save_png(Image.fromarray(np.ascontiguousarray(mask)), compress_level=compress_level)


def _save_png(im: Image.Image, **params: Any) -> bytes:
    buf = BytesIO()
    im.save(buf, format="PNG", **params)
    return buf.getvalue()


def read_png_text(data: bytes) -> dict[str, str]:
    """Return the tEXt/zTXt/iTXt chunks of a PNG as a plain dict; non-PNG -> DecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(data))
        with im:
            if not isinstance(im, PngImagePlugin.PngImageFile):
                raise DecodeError("unsupported_format", f"expected a PNG, got {im.format}")
            # .text also parses chunks after IDAT, which requires decoding the image.
            return {str(k): str(v) for k, v in im.text.items()}
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(_failure_kind(e, data), f"cannot read PNG text: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------ content id


def content_id(data: bytes, spec_hash: str) -> str:
    """Stable id of (input bytes, edit spec): hex ``sha256(b"promptpaint-content-id-v1\\0" +
    sha256(data).digest() + spec_hash.encode("utf-8"))``.

    Hashing the data first gives a fixed-length prefix, so no (data, spec_hash) pair can collide with
    another by shifting bytes between them. Changing this formula invalidates every cached output.
    """
    h = hashlib.sha256(b"promptpaint-content-id-v1\0")
    h.update(hashlib.sha256(data).digest())
    h.update(spec_hash.encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- fsspec


def read_bytes(uri: str) -> bytes:
    """Read a whole file from a local path or fsspec URI."""
    if "://" not in uri and os.path.isfile(uri):
        # A local file, read as named: fsspec would parse "a::b.jpg" as a URL chain and miss it.
        with open(uri, "rb") as f:
            return f.read()
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    """True when ``uri`` names an existing file or folder."""
    fs, path = fsspec.core.url_to_fs(uri)
    return bool(fs.exists(path))


def local_path(uri: str) -> str | None:
    """The local filesystem path behind ``uri`` (plain path or ``file://``), or None for other filesystems."""
    fs, path = fsspec.core.url_to_fs(uri)
    return path if isinstance(fs, LocalFileSystem) else None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI, keeping its ``scheme://`` prefix.

    Leading slashes on ``parts`` are ignored so a part can never replace ``base``.
    """
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *clean)}" if clean else base
    return os.path.join(base, *clean)


def atomic_write(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see either the old file or the complete new one.

    The bytes go to a hidden sibling ``.{name}.tmp-{uuid}`` that is then renamed over the target; on
    any failure the temp file is removed and the exception re-raised. Local paths use ``os.replace``
    (atomic on POSIX) and create missing parent folders. Other fsspec backends use ``fs.pipe`` +
    ``fs.mv``: object stores (S3, GCS) already make a single PUT atomic, so there the temp + move is
    only belt-and-braces (it costs an extra copy), while backends with real renames get atomicity.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write needs bytes, got {type(data).__name__}")
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        _atomic_write_local(path, data)
    else:
        _atomic_write_fs(fs, path, data)


def _temp_sibling(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")


_TEMP_NAME_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def remove_temp_files(uri: str, subfolders: Sequence[str] = ("", "images", "masks", "manifest")) -> int:
    """Delete :func:`atomic_write` temp files (``.{name}.tmp-{uuid}``) that a killed writer left in ``uri``
    and its ``subfolders`` (not recursive); returns how many.

    Only safe while nothing else writes there: call it at job start, before any worker runs.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    removed = 0
    for sub in subfolders:
        folder = posixpath.join(root.rstrip("/"), sub) if sub else root
        if not fs.isdir(folder):
            continue
        for p in fs.ls(folder, detail=False):
            if _TEMP_NAME_RE.match(posixpath.basename(p.rstrip("/"))):
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(p)
                    removed += 1
    return removed


def _atomic_write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            # Without fsync a crash right after the rename can leave a zero-length "complete" file.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write_fs(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & _OBJECT_STORES:
        fs.makedirs(posixpath.dirname(path) or fs.root_marker, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        fs.pipe_file(tmp, bytes(data))
        fs.mv(tmp, path)
    except BaseException:
        # Best effort: a failed cleanup must not mask the original error.
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def expand_input(uri_or_glob: str, extensions: Sequence[str] | None = None) -> list[str]:
    """List the input files named by a file, a folder (recursive) or a glob, sorted.

    A file is returned as is. Folders yield files whose extension (case-insensitive) is in
    ``extensions`` (default :data:`IMAGE_EXTENSIONS`); globs yield every matching file, filtered only
    when ``extensions`` is given. Both skip hidden entries (``.name``: AppleDouble ``._x.jpg`` files, temp
    files from :func:`atomic_write`, ``.git``) unless the glob itself names a dot entry, as a shell
    would. Local results are absolute paths; other URIs keep their ``scheme://``.
    Raises FileNotFoundError when nothing matches. For corpora too large to list at once, see
    :func:`iter_inputs` (the same files in the same order, streamed).
    """
    return [path for path, _ in iter_inputs(uri_or_glob, extensions)]


def iter_inputs(uri_or_glob: str, extensions: Sequence[str] | None = None) -> Iterator[tuple[str, str]]:
    """``expand_input``'s files in the same (sorted) order, each with its output name (``output_names``),
    streamed: a folder is walked one directory at a time, so memory is bounded by the largest directory,
    not the corpus. (A glob is still listed whole: fsspec's glob returns every match at once.)
    Raises FileNotFoundError when nothing matches (on the first ``next``).
    """
    fs, path = fsspec.core.url_to_fs(uri_or_glob)
    wanted = {e.lower().lstrip(".") for e in (extensions or IMAGE_EXTENSIONS)}
    root = input_root(uri_or_glob)
    if _is_glob(uri_or_glob):
        found = sorted(
            _with_scheme(uri_or_glob, fs, p) for p in _glob_files(fs, path, wanted if extensions is not None else None)
        )
        names = output_names(found, root)
        stream: Iterator[tuple[str, str]] = ((p, names[p]) for p in found)
    elif fs.isfile(path):
        uri = _with_scheme(uri_or_glob, fs, path)
        stream = iter([(uri, output_names([uri], root)[uri])])
    elif fs.isdir(path):
        stream = _walk_sorted(fs, path.rstrip("/") or "/", wanted, uri_or_glob, root)
    else:
        raise FileNotFoundError(f"input {uri_or_glob!r} does not exist")
    first = next(stream, None)
    if first is None:
        raise FileNotFoundError(f"no input files matched {uri_or_glob!r} (extensions: {', '.join(sorted(wanted))})")
    yield first
    yield from stream


def _walk_sorted(
    fs: fsspec.AbstractFileSystem, folder: str, wanted: set[str], original: str, root: str
) -> Iterator[tuple[str, str]]:
    """Files under ``folder`` in the order ``sorted()`` gives their full paths, one directory listed at a time.

    In a directory, a subfolder ``a`` sorts as ``a/`` (everything under it starts so): files and subfolders
    merged in that order give exactly the global sort, without holding more than one directory per level.
    """
    files, dirs = _list_dir(fs, folder)
    files = [n for n in files if _extension(n) in wanted]
    names = output_names([_with_scheme(original, fs, f"{folder}/{n}") for n in files], root)
    for key, is_dir in sorted([(n, False) for n in files] + [(n + "/", True) for n in dirs]):
        if is_dir:
            yield from _walk_sorted(fs, f"{folder}/{key[:-1]}", wanted, original, root)
        else:
            uri = _with_scheme(original, fs, f"{folder}/{key}")
            yield uri, names[uri]


def _list_dir(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[list[str], list[str]]:
    """(file names, folder names) directly in ``folder``, hidden ones left out."""
    files, dirs = [], []
    if isinstance(fs, LocalFileSystem):  # scandir: names and types without a stat per file
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                (dirs if e.is_dir() else files).append(e.name)
        return files, dirs
    # Fresh, and not kept: s3fs/gcsfs cache every listing they make (a second run in this process would miss
    # new files, and a walk over a whole corpus would keep all of it in memory).
    fs.invalidate_cache(folder)
    for info in fs.ls(folder, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") or not name:
            continue
        (dirs if info.get("type") == "directory" else files).append(name)
    fs.invalidate_cache(folder)
    return files, dirs


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob_files(fs: fsspec.AbstractFileSystem, pattern: str, wanted: set[str] | None) -> list[str]:
    # fsspec's glob, unlike the shell's, lets "*" match dot files (including our own temp files).
    parts = pattern.split("/")
    literal = "/".join(parts[: next((i for i, part in enumerate(parts) if _is_glob(part)), len(parts))])
    keep_hidden = "/." in pattern or pattern.startswith(".")
    return [
        p
        for p, info in fs.glob(pattern, detail=True).items()
        if info.get("type") == "file"
        and (wanted is None or _extension(p) in wanted)
        and (keep_hidden or not _hidden_below(literal, p))
    ]


def _extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower().lstrip(".")


def _hidden_below(root: str, path: str) -> bool:
    relative = path[len(root) :].lstrip("/")
    return any(part.startswith(".") for part in relative.split("/"))


def _with_scheme(original: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    scheme = original.split("://", 1)[0]
    # memory:// keeps paths under a "/" root; "memory://x/a.png" and "memory:///x/a.png" are the same file.
    return f"{scheme}://{path.lstrip('/')}"
