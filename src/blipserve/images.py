"""Turn anything a client sends (URL, base64, data URL, bytes, a path) into an RGB image.

Everything here treats its input as hostile: sizes are checked before pixels are decoded,
only common raster formats are opened (no EPS/PostScript, no plugin zoo), Pillow's global
settings are never changed (it is shared by the whole process), and every failure becomes
an :class:`~blipserve.errors.ImageError` whose message says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from blipserve.config import ImageLimits
from blipserve.errors import ImageError, UrlRefused, quote

# Raster formats people actually send.  Everything else Pillow can open (EPS runs
# Ghostscript, and many rarely used parsers are a needless attack surface) is refused.
_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF")
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_WHITE = (255, 255, 255, 255)


@functools.cache
def _formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (unknown names make open() fail)."""
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def decode_base64(text: str) -> bytes:
    """Decode base64 image text: plain, wrapped, data URL, urlsafe, padding optional."""
    payload = text.strip()
    if payload[:5].lower() == "data:":
        header, comma, payload = payload[5:].partition(",")
        if not comma:
            raise ImageError("image is not valid base64: data URL has no ',' before the data")
        if ";base64" not in header.lower():
            raise ImageError("image is not valid base64: the data URL is not ';base64'")
        if "%" in payload:  # a percent-encoded data URL (%2B for +)
            payload = unquote(payload)
    # Line breaks (base64.encodebytes, MIME) and stray spaces anywhere are ignored.
    payload = "".join(payload.split()).rstrip("=")
    if not payload:
        raise ImageError("image is empty (no base64 data)")
    if "-" in payload or "_" in payload:  # urlsafe alphabet
        payload = payload.translate(str.maketrans("-_", "+/"))
    bad = _NOT_BASE64.search(payload)
    if bad is not None:
        raise ImageError(f"image is not valid base64: unexpected character {bad.group()!r}")
    if len(payload) % 4 == 1:
        raise ImageError("image is not valid base64: the length is wrong (data is cut short)")
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image is not valid base64: {exc}") from None


def _preview(data: bytes) -> str:
    head = data.lstrip()[:12]
    return "".join(chr(b) if 32 <= b < 127 and b != 39 else f"\\x{b:02x}" for b in head)


def _unrecognised(data: bytes) -> ImageError:
    """The error for bytes Pillow cannot identify, with a hint at what they are."""
    if any(data.startswith(m) for m in _MAGIC) or data[8:12] == b"WEBP":
        return ImageError("image data is truncated or corrupt: the header cannot be parsed")
    start = data[:1024].lower()
    hint = ""
    if b"<svg" in start:
        hint = "; SVG (vector) images are not supported, send PNG or JPEG"
    elif b"<html" in start or b"<!doctype html" in start:
        hint = "; it looks like an HTML page, not an image"
    return ImageError(f"not a recognised image (starts with '{_preview(data)}'){hint}")


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, more than the "
            f"{limits.max_image_pixels} pixel limit (max_image_pixels)"
        )


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit int or float single-channel array to 0..255."""
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values * (255.0 / 65535.0)  # full 16-bit range: 65535 -> 255, no clipping
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    elif mode == "F" and lo >= 0 and hi <= 255.0:
        scaled = values
    else:  # arbitrary range (e.g. signed 32-bit, HDR float): stretch to fit
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's own convert("L") clips 16-bit values at 255 instead of scaling them.
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX; RGB gives a copy
    except ValueError as exc:
        raise ImageError(f"image colour mode {mode} is not supported: {exc}") from None


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        pass
    return img


def decode_image(data: bytes, limits: ImageLimits, target_size: int | None = None) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image (first frame of animations).

    ``target_size`` is the side the model resizes to; with ``limits.draft_decode`` a large
    JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT) but never with a side
    below twice ``target_size``.  Why twice: decoded down to the target itself, the model's
    input changed enough to change texts (a 640x480 JPEG for BLIP-2's 224 px decoded at
    320x240: vision features' cosine to a full decode 0.9991 on the worst of six photos,
    BLIP-base's 384 px from 1024x768 at 512x384: 0.9991), while at twice or more it stayed
    0.99988 or higher (bench/results/draft-old-rule.txt); and the decode costs the same
    (a 4000x3000 JPEG: 23 ms at 1/2 scale, 25 at 1/4, 71 in full), since most of its time
    is entropy decoding, at any scale.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise ImageError(
            f"image is {len(data)} bytes, more than the {limits.max_image_bytes} byte limit "
            "(max_image_bytes)"
        )
    try:
        # BytesIO, not a file: nothing to leak; `with` still releases Pillow's references.
        with Image.open(io.BytesIO(data), formats=_formats()) as img:
            # The size comes from the header: refuse bombs before any pixel is decoded.
            _check_pixels(img.size, limits)
            if (
                limits.draft_decode
                and target_size
                and img.format in _DRAFT_FORMATS
                and min(img.size) >= 4 * target_size
            ):
                # Pillow picks the largest 1/2^k scale keeping both sides >= 2 x target.
                img.draft("RGB", (2 * target_size, 2 * target_size))
            img.load()
            pixels = _orient(img)
            if not (limits.draft_decode and target_size):
                return _to_rgb(pixels)
            if pixels.mode in _REDUCIBLE:
                pixels = _shrink(pixels, target_size)  # before a conversion copies them
            # (other modes, e.g. palette, shrink once converted: a no-op if done above)
            return _shrink(_to_rgb(pixels), target_size)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (only reachable when its limit is below ours, or a frame
        # inside an animation is larger than the canvas); a warning counts when warnings
        # are errors.
        raise ImageError(
            f"image is too large to decode safely ({exc}; max_image_pixels is "
            f"{limits.max_image_pixels})"
        ) from None
    except UnidentifiedImageError:
        raise _unrecognised(data) from None
    except Exception as exc:  # any parser failure on hostile bytes is bad input
        detail = str(exc) or type(exc).__name__
        raise ImageError(f"image data is truncated or corrupt: {detail}") from None


# Modes whose pixels ``Image.reduce`` averages as they are (palette and 16-bit images are
# converted to RGB first, at full size, and reduced after).
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


def _shrink(img: Image.Image, target_size: int) -> Image.Image:
    """``img`` with each side reduced by the largest whole factor keeping it >= 2 x target.

    A decoded 40 MP PNG is 120 MB, and the processor's float conversion of it four times
    that; rows wait in the queue as decoded images, so without this one request of large,
    highly compressible images could take gigabytes.  After it, no side exceeds 4 x target
    (a 384 px model: at most 1536 x 1536, 7 MB).  Each side has its own factor, so a long
    thin image shrinks too: the processors of the BLIP family stretch every image to a
    ``target_size`` square anyway.  ``reduce`` averages whole blocks (no aliasing), and the
    processor's own resize still follows, from at least twice its output size.
    """
    width, height = img.size
    factors = (max(1, width // (2 * target_size)), max(1, height // (2 * target_size)))
    if max(factors) < 2:
        return img
    return img.reduce(factors)


def _read_path(path: Path, limits: ImageLimits) -> bytes:
    try:
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise ImageError(
                f"image file '{path}' is {size} bytes, more than the "
                f"{limits.max_image_bytes} byte limit (max_image_bytes)"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image file '{path}': {exc.strerror or exc}") from None


def could_be_path(text: str) -> bool:
    """Whether ``text`` can name a file at all: checked without touching the filesystem.

    Base64 of any real image is longer than a path may be, or wrapped over lines
    (``base64.encodebytes``), or has a path component longer than file systems allow.
    """
    if len(text) > 4096 or "\n" in text or "\x00" in text:
        return False
    return all(len(part.encode()) <= 255 for part in text.replace("\\", "/").split("/"))


def _is(check: Callable[[], bool]) -> bool:
    """A filesystem check that answers False instead of raising (odd names, permissions)."""
    try:
        return check()
    except (OSError, ValueError):
        return False


class Fetcher(Protocol):
    """What downloads an image URL's bytes (:class:`blipserve.fetch.SafeFetcher`, or one
    that wraps it)."""

    def fetch(self, url: str) -> bytes: ...


def load_image(
    source: str | bytes,
    *,
    limits: ImageLimits,
    fetcher: Fetcher | None,
    target_size: int | None = None,
    allow_paths: bool = False,
) -> Image.Image:
    """Load an RGB image from bytes, an http(s) URL, a data URL / base64 text or a path.

    Paths are only considered with ``allow_paths`` (CLI and batch jobs, never HTTP
    requests); an existing file wins over reading the text as base64.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits, target_size)
    if not isinstance(source, str):
        raise ImageError(f"image must be a string or bytes, not {type(source).__name__}")
    text = source.strip()
    if not text:
        raise ImageError("image is empty")
    match = _URL_SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        if fetcher is None:
            raise UrlRefused("URL refused: URLs are not accepted here")
        return decode_image(fetcher.fetch(text), limits, target_size)
    if scheme == "data":
        return decode_image(decode_base64(text), limits, target_size)
    if allow_paths and could_be_path(text):
        path = Path(text).expanduser()
        if _is(path.is_file):
            return decode_image(_read_path(path, limits), limits, target_size)
        if _is(path.is_dir):
            raise ImageError(f"image path {quote(text, 300)} is a directory, not a file")
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive ("C:")
        raise UrlRefused(f"URL refused: scheme {scheme!r} is not allowed (only http and https)")
    # Base64 is about 4/3 of the bytes (plus line breaks): refuse huge text before decoding.
    if len(text) > limits.max_image_bytes * 1.4 + 1024:
        raise ImageError(
            f"image text is {len(text)} characters, too long for the "
            f"{limits.max_image_bytes} byte limit (max_image_bytes)"
        )
    try:
        return decode_image(decode_base64(text), limits, target_size)
    except ImageError as exc:
        if allow_paths and could_be_path(text):
            # Text that is neither a file nor an image: most likely a wrong path.
            raise ImageError(
                f"image file not found: {quote(text, 300)} (and as base64: {exc.message})"
            ) from None
        raise
