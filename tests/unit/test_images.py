"""images: base64 variants, every image kind we accept, and the inputs we must refuse."""

from __future__ import annotations

import base64
import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blipserve.config import FetchConfig, ImageLimits
from blipserve.errors import ImageError, UrlRefused
from blipserve.fetch import SafeFetcher
from blipserve.images import decode_base64, decode_image, load_image
from helpers import make_image, png_bytes

LIMITS = ImageLimits()
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def close_to(actual: tuple[int, ...] | Any, expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(width: int, height: int, bit_depth: int, colour: int, rows: bytes | None) -> bytes:
    """A PNG written by hand, so its header can declare anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows or b"", 9))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    datasets = pytest.importorskip("sklearn.datasets")
    return {
        "astronaut": skimage_data.astronaut(),
        "chelsea": skimage_data.chelsea(),
        "china": datasets.load_sample_image("china.jpg"),
    }


# --- base64 ---------------------------------------------------------------------------

PAYLOAD = png_bytes(make_image(1))


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PAYLOAD).decode(),
        base64.encodebytes(PAYLOAD).decode(),
        "  \n" + base64.b64encode(PAYLOAD).decode() + "\r\n",
        "data:image/png;base64," + base64.b64encode(PAYLOAD).decode(),
        "DATA:image/PNG;BASE64," + base64.encodebytes(PAYLOAD).decode(),
        "data:image/png;base64," + base64.b64encode(PAYLOAD).decode().replace("+", "%2B"),
        base64.b64encode(PAYLOAD).decode().rstrip("="),
        base64.urlsafe_b64encode(PAYLOAD).decode(),
        base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("="),
    ],
    ids=[
        "plain",
        "lines",
        "spaces",
        "data-url",
        "data-url-case",
        "percent",
        "no-pad",
        "urlsafe",
        "urlsafe-no-pad",
    ],
)
def test_decode_base64_variants(text: str) -> None:
    assert decode_base64(text) == PAYLOAD


@pytest.mark.parametrize("length", range(1, 9))
def test_decode_base64_any_length_without_padding(length: int) -> None:
    data = bytes(range(250, 250 - length, -1))  # bytes that give + and / (or - and _)
    assert decode_base64(base64.b64encode(data).decode().rstrip("=")) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("=")) == data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("data:image/png;base64,", "empty"),
        ("not base64 at all!", r"not valid base64: unexpected character '!'"),
        ("abcde", "not valid base64: the length is wrong"),
        ("ab=cd", "not valid base64: unexpected character '='"),
        ("héllo", "not valid base64: unexpected character 'é'"),
        ("data:image/png,iVBORw0KGgo", "not ';base64'"),
        ("data:image/png;base64", "no ','"),
    ],
)
def test_decode_base64_garbage(text: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_base64(text)


# --- photos and plain images ----------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "china"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_real_photos(photos: dict[str, np.ndarray], name: str, fmt: str) -> None:
    array = photos[name]
    image = decode_image(encode(Image.fromarray(array), fmt, quality=95), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (array.shape[1], array.shape[0])
    difference = np.abs(pixels(image) - array.astype(np.int16)).mean()
    assert difference == 0 if fmt == "PNG" else difference < 4


@pytest.mark.parametrize("size", [(1, 1), (20000, 20), (20, 20000)])
def test_extreme_shapes(size: tuple[int, int]) -> None:
    image = decode_image(encode(Image.new("RGB", size, BLUE), "PNG"), LIMITS)
    assert image.size == size
    assert image.getpixel((0, 0)) == BLUE


def test_result_is_loaded_and_independent() -> None:
    image = decode_image(encode(make_image(2), "JPEG"), LIMITS)
    assert type(image) is Image.Image  # a plain image, not a lazy file-backed one
    assert image.mode == "RGB"
    assert image.copy().getpixel((0, 0)) == image.getpixel((0, 0))


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"image is empty \(0 bytes\)"),
        (
            b"\x00\x01\x02garbage!",
            r"not a recognised image \(starts with '\\x00\\x01\\x02garbage!'\)",
        ),
        (b"hello world", "not a recognised image .starts with 'hello world'"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "starts with '<svg xmlns=\"'.*SVG"),
        (b'<?xml version="1.0"?>\n<svg/>', "starts with '<.xml versio'.*SVG"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated or corrupt"),
    ],
)
def test_not_an_image(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data, LIMITS)


def test_too_many_bytes() -> None:
    with pytest.raises(ImageError, match=r"more than the 100 byte limit \(max_image_bytes\)"):
        decode_image(encode(make_image(0), "PNG"), ImageLimits(max_image_bytes=100))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated(photos: dict[str, np.ndarray], fmt: str) -> None:
    data = encode(Image.fromarray(photos["chelsea"]), fmt)
    with pytest.raises(ImageError, match="image data is truncated or corrupt"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_png_bomb_refused_from_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # 12000x5000 1-bit all-zero PNG: a few KB on disk, 60 M pixels decoded (180 MB as RGB).
    width, height = 12000, 5000
    data = raw_png(width, height, 1, 0, (b"\x00" * (1 + width // 8)) * height)
    assert len(data) < 20_000

    def no_decoding(self: Any) -> None:
        raise RuntimeError("pixels were decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageError, match=r"12000x5000 = 60000000 pixels, more than the 40000000"):
        decode_image(data, LIMITS)


def test_small_pixel_limit() -> None:
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, more than the 9999 pixel"):
        decode_image(encode(make_image(0, (100, 100)), "PNG"), ImageLimits(max_image_pixels=9999))


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])
def test_png_bomb_beyond_pillow_limit(size: tuple[int, int]) -> None:
    # Pillow's own guard fires first: an error (> 2x its limit) or a warning (> 1x), which
    # pytest turns into an error; both become ImageError.
    with pytest.raises(ImageError, match=r"too large to decode safely|pixel limit"):
        decode_image(raw_png(*size, 8, 0, None), LIMITS)


def test_bomb_when_pillow_only_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="10000x10000 = 100000000 pixels"):
            decode_image(raw_png(10_000, 10_000, 8, 0, None), LIMITS)


@pytest.mark.parametrize(
    ("size", "message"),
    [((65535, 65535), "too large to decode safely|pixel limit"), ((8000, 6000), "8000x6000")],
)
def test_gif_bomb(size: tuple[int, int], message: str) -> None:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", *size)  # the logical screen size in the header
    assert len(data) < 100
    with pytest.raises(ImageError, match=message):
        decode_image(bytes(data), LIMITS)


# --- modes and containers -------------------------------------------------------------


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    image = decode_image(data, LIMITS)
    assert pixels(image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert pixels(image)[0, 3].tolist() == [255, 255, 255]


def test_16_bit_rgb_png() -> None:
    row = b"\x00" + struct.pack(">6H", 65535, 0, 32896, 0, 0, 65535)
    image = decode_image(raw_png(2, 1, 16, 2, row), LIMITS)
    assert image.getpixel((0, 0)) == (255, 0, 128)
    assert image.getpixel((1, 0)) == (0, 0, 255)


def test_32_bit_int_and_float_tiff() -> None:
    ints = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.int32))
    assert pixels(decode_image(encode(ints, "TIFF"), LIMITS))[0, :, 0].tolist() == [0, 255, 128]
    floats = Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32))
    assert pixels(decode_image(encode(floats, "TIFF"), LIMITS))[0, :, 0].tolist() == [0, 255, 128]


def test_cmyk_jpeg() -> None:
    image = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (16, 0, 32, 16))  # magenta + yellow = red
    decoded = decode_image(encode(image, "JPEG", quality=95), LIMITS)
    assert decoded.mode == "RGB"
    assert close_to(decoded.getpixel((4, 8)), WHITE)
    assert close_to(decoded.getpixel((28, 8)), RED)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [("1", 1, WHITE), ("1", 0, (0, 0, 0)), ("L", 100, (100, 100, 100)), ("P", 0, (0, 0, 0))],
)
def test_simple_modes(mode: str, colour: int, expected: tuple[int, int, int]) -> None:
    assert (
        decode_image(encode(Image.new(mode, (4, 4), colour), "PNG"), LIMITS).getpixel((0, 0))
        == expected
    )


def test_rgba_composited_on_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    decoded = decode_image(encode(image, "PNG"), LIMITS)
    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((1, 0)) == BLUE
    assert close_to(decoded.getpixel((2, 0)), (127, 127, 127), tol=1)


def test_la_and_palette_transparency() -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    assert decode_image(encode(la, "PNG"), LIMITS).getpixel((0, 0)) == WHITE
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        decoded = decode_image(encode(palette, fmt, transparency=0), LIMITS)
        assert decoded.getpixel((0, 0)) == WHITE
        assert decoded.getpixel((1, 0)) == RED


def test_rgb_with_transparent_colour() -> None:
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), BLUE)
    decoded = decode_image(encode(image, "PNG", transparency=(0, 0, 0)), LIMITS)
    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((1, 0)) == BLUE


@pytest.mark.parametrize(
    ("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("TIFF", {})]
)
def test_first_frame_of_animation(fmt: str, params: dict[str, Any]) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert close_to(decode_image(data, LIMITS).getpixel((8, 8)), RED, tol=2)


def red_left_half(size: tuple[int, int] = (40, 20)) -> Image.Image:
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


@pytest.mark.parametrize(
    ("orientation", "size", "red_at", "blue_at"),
    [
        (1, (40, 20), (2, 10), (38, 10)),
        (3, (40, 20), (38, 10), (2, 10)),  # 180 degrees
        (6, (20, 40), (10, 2), (10, 38)),  # stored left column is shown on top
        (8, (20, 40), (10, 38), (10, 2)),
    ],
)
def test_exif_orientation(
    orientation: int, size: tuple[int, int], red_at: tuple[int, int], blue_at: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(red_left_half(), "JPEG", exif=exif.tobytes()), LIMITS)
    assert decoded.size == size
    assert close_to(decoded.getpixel(red_at), RED, tol=30)
    assert close_to(decoded.getpixel(blue_at), BLUE, tol=30)


def test_huge_exif_and_icc_still_decode() -> None:
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 60_000  # ImageDescription: close to the 64 KB APP1 limit
    icc = rng.integers(0, 256, 1_500_000, dtype=np.uint8).tobytes()  # spans 24 APP2 markers
    data = encode(red_left_half(), "JPEG", exif=exif.tobytes(), icc_profile=icc)
    assert len(data) > 1_500_000
    assert decode_image(data, LIMITS).size == (20, 40)

    png = encode(red_left_half(), "PNG", exif=exif.tobytes(), icc_profile=icc[:500_000])
    assert decode_image(png, LIMITS).size == (20, 40)


# --- draft decoding -------------------------------------------------------------------


def gradient_jpeg(width: int, height: int) -> bytes:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    array = np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8)
    return encode(Image.fromarray(array), "JPEG", quality=85)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # smaller side below 4x target: full decode, then a long side shrinks on its own
        ((767, 2000), (767, 1000)),
        ((769, 769), (769, 769)),
        ((4000, 800), (800, 800)),
        ((800, 4000), (800, 800)),
        ((1535, 3000), (1535, 1000)),  # each side by its own factor: 1, 3
        # draft to the largest 1/2^k keeping both sides >= 768, then whole-factor shrink
        ((3072, 3071), (768, 768)),  # 1/4
        ((3200, 3200), (800, 800)),  # 1/4
        ((4000, 3000), (1000, 1500)),  # 1/2 -> (2000, 1500), then factors 2 and 1
    ],
)
def test_draft_keeps_each_side_at_least_twice_the_target(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = gradient_jpeg(*size)
    image = decode_image(data, LIMITS, target_size=384)
    assert image.size == expected
    assert min(image.size) >= min(2 * 384, *size)
    assert decode_image(data, ImageLimits(draft_decode=False), target_size=384).size == size
    assert decode_image(data, LIMITS).size == size


def test_draft_changes_model_input_only_slightly(photos: dict[str, np.ndarray]) -> None:
    big = Image.fromarray(photos["china"]).resize((3000, 2000), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=90)
    drafted = decode_image(data, LIMITS, target_size=384)
    full = decode_image(data, ImageLimits(draft_decode=False), target_size=384)
    assert drafted.size == (1500, 1000)  # 1/2 scale (1/4 would be 750 x 500: under 768)
    assert full.size == (3000, 2000)
    small = [im.resize((384, 384), Image.Resampling.BICUBIC) for im in (drafted, full)]
    assert np.abs(pixels(small[0]) - pixels(small[1])).mean() < 1.5


@pytest.mark.parametrize("side", [224, 384])
def test_a_camera_sized_jpeg_is_decoded_in_full_for_a_small_model_input(
    photos: dict[str, np.ndarray], side: int
) -> None:
    """The issue's case: a 640x480 JPEG for BLIP-2 (224 px) was decoded at 320x240, and
    its text then differed from transformers' pipeline on the same bytes."""
    data = encode(Image.fromarray(photos["astronaut"]).resize((640, 480)), "JPEG", quality=90)
    drafted = decode_image(data, LIMITS, target_size=side)
    full = decode_image(data, ImageLimits(draft_decode=False), target_size=side)
    assert drafted.size == (640, 480)
    assert np.array_equal(pixels(drafted), pixels(full))


def test_draft_never_applies_to_png() -> None:
    data = encode(Image.new("RGB", (1500, 1500), RED), "PNG")
    assert decode_image(data, LIMITS, target_size=384).size == (1500, 1500)


def test_large_images_are_shrunk_after_decoding_but_never_below_twice_the_target() -> None:
    data = encode(Image.new("RGB", (6000, 3300), RED), "PNG")
    image = decode_image(data, LIMITS, target_size=384)
    assert image.size == (858, 825)  # each side by its own factor: 6000 / 7, 3300 / 4
    assert min(image.size) >= 2 * 384
    assert max(image.size) < 4 * 384
    assert image.getpixel((700, 400)) == RED
    thin = decode_image(encode(Image.new("RGB", (20000, 700), RED), "PNG"), LIMITS, 384)
    assert thin.size == (770, 700)  # a long thin image shrinks along its long side only
    # palette images cannot be reduced as they are: they shrink once converted to RGB
    palette = Image.new("RGB", (6000, 3300), RED).convert("P", palette=Image.Palette.ADAPTIVE)
    shrunk = decode_image(encode(palette, "PNG"), LIMITS, target_size=384)
    assert shrunk.size == (858, 825)
    assert shrunk.mode == "RGB"
    exact = ImageLimits(max_image_pixels=LIMITS.max_image_pixels, draft_decode=False)
    assert decode_image(data, exact, target_size=384).size == (6000, 3300)


# --- load_image -----------------------------------------------------------------------


class StubFetcher(SafeFetcher):
    def __init__(self, data: bytes) -> None:
        super().__init__(FetchConfig())
        self.data = data
        self.urls: list[str] = []

    def fetch(self, url: str) -> bytes:
        self.urls.append(url)
        return self.data


def test_load_image_sources(tmp_path: Path) -> None:
    image = make_image(5)
    data = png_bytes(image)
    expected = pixels(image)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    fetcher = StubFetcher(data)
    sources: list[str | bytes] = [
        data,
        base64.b64encode(data).decode(),
        base64.encodebytes(data).decode(),
        "data:image/png;base64," + base64.b64encode(data).decode(),
        " https://example.com/cat.png ",
    ]
    for source in sources:
        loaded = load_image(source, limits=LIMITS, fetcher=fetcher)
        assert (pixels(loaded) == expected).all()
    assert fetcher.urls == ["https://example.com/cat.png"]
    loaded = load_image(str(path), limits=LIMITS, fetcher=None, allow_paths=True)
    assert (pixels(loaded) == expected).all()


def test_load_image_url_without_fetcher() -> None:
    with pytest.raises(UrlRefused, match="URLs are not accepted"):
        load_image("http://example.com/a.png", limits=LIMITS, fetcher=None)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/"])
@pytest.mark.parametrize("allow_paths", [False, True])
def test_load_image_other_schemes_refused(url: str, allow_paths: bool) -> None:
    with pytest.raises(UrlRefused, match="scheme"):
        load_image(url, limits=LIMITS, fetcher=StubFetcher(b""), allow_paths=allow_paths)


def test_paths_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(make_image(0)))
    with pytest.raises(ImageError, match="base64"):
        load_image(str(path), limits=LIMITS, fetcher=None)


def test_missing_or_bad_paths(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match=f"image file not found: '{missing}'"):
        load_image(str(missing), limits=LIMITS, fetcher=None, allow_paths=True)
    with pytest.raises(ImageError, match="is a directory"):
        load_image(str(tmp_path), limits=LIMITS, fetcher=None, allow_paths=True)
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(make_image(0)))
    with pytest.raises(ImageError, match=f"image file '{big}' is .* bytes, more than the 10"):
        load_image(str(big), limits=ImageLimits(max_image_bytes=10), fetcher=None, allow_paths=True)


def test_no_file_handles_leak(tmp_path: Path) -> None:
    paths = []
    for i, fmt in enumerate(["PNG", "JPEG", "GIF", "TIFF"]):
        paths.append(tmp_path / f"image{i}.{fmt.lower()}")
        paths[-1].write_bytes(encode(make_image(i), fmt))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    before = len(os.listdir(fd_dir))
    for _ in range(5):
        for path in paths:
            load_image(str(path), limits=LIMITS, fetcher=None, allow_paths=True)
        with pytest.raises(ImageError):
            load_image(str(tmp_path / "bad.png"), limits=LIMITS, fetcher=None, allow_paths=True)
    assert len(os.listdir(fd_dir)) == before


def test_load_image_rejects_empty_and_oversized_text() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image("  ", limits=LIMITS, fetcher=None)
    with pytest.raises(ImageError, match="too long"):
        load_image("A" * 20_000, limits=ImageLimits(max_image_bytes=1000), fetcher=None)
