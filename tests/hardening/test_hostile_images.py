"""Hostile and odd images, made here, sent through the real server's POST /score.

Each hostile image rides in row 1 of a two-row request (row 0 is a good image): the answer
must be a 400 whose message names row 1 and the reason, quickly and without the server's
memory jumping. Each valid-but-odd image (1x1, 20000x20, 16-bit, CMYK, multi-frame TIFF,
huge EXIF and ICC blocks) must get the same answer as its pixels sent as a plain RGB PNG.
The decoder-level tests of the same inputs are in tests/unit/test_images.py.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from blipserve.config import ImageLimits
from blipserve.images import decode_image
from helpers import b64_png, make_image
from testkit.live_server import RunningServer


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(width: int, height: int, bit_depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written by hand, so that its header can declare anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png_bomb() -> bytes:
    # 12000x5000 1-bit zeros: ~10 KB on the wire, 60 M pixels (180 MB as RGB) if decoded.
    width, height = 12000, 5000
    return raw_png(width, height, 1, 0, (b"\x00" * (1 + width // 8)) * height)


def png_text_bomb() -> bytes:
    # A zTXt chunk of 64 MB of zeros, 64 KB compressed, inside an otherwise fine PNG.
    good = encode(make_image(2), "PNG")
    ztxt = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
    return good[:33] + ztxt + good[33:]  # after the signature and IHDR


def png_header_bomb() -> bytes:
    return raw_png(100_000, 100_000, 8, 0, b"")  # 10 G pixels declared, no data


def gif_bomb(size: tuple[int, int]) -> bytes:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", *size)  # the logical screen size
    return bytes(data)


def jpeg_bomb() -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def tiff_bomb() -> bytes:
    data = bytearray(encode(Image.new("L", (4, 4)), "TIFF"))
    # patch ImageWidth (256) and ImageLength (257) in the first IFD (little-endian, SHORT/LONG)
    ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[ifd : ifd + 2])[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):
            value = struct.pack("<H", 60000) + b"\0\0" if kind == 3 else struct.pack("<I", 60000)
            data[entry + 8 : entry + 12] = value
    return bytes(data)


def truncated(fmt: str) -> bytes:
    data = encode(make_image(3, (256, 192)), fmt)
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    values = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


def cmyk_jpeg() -> bytes:
    image = Image.new("CMYK", (64, 48), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (32, 0, 64, 48))
    return encode(image, "JPEG", quality=95)


def multi_frame_tiff() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def huge_exif_and_icc_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the answer must follow the orientation
    exif[0x010E] = "x" * 60_000  # close to the 64 KB APP1 limit
    icc = np.random.default_rng(0).integers(0, 256, 1_500_000, dtype=np.uint8).tobytes()
    return encode(make_image(4, (64, 48)), "JPEG", exif=exif.tobytes(), icc_profile=icc)


HOSTILE: dict[str, tuple[Callable[[], bytes | str], str]] = {
    # name: (payload: bytes are base64-encoded, str sent as is; what the message says)
    "png-bomb": (png_bomb, r"12000x5000 = 60000000 pixels, more than the 40000000"),
    "png-text-bomb": (png_text_bomb, "truncated or corrupt"),
    "png-header-bomb": (png_header_bomb, "too large to decode safely|pixel limit"),
    "gif-bomb-65535": (lambda: gif_bomb((65535, 65535)), "too large to decode safely|pixel"),
    "gif-bomb-8000x6000": (lambda: gif_bomb((8000, 6000)), "8000x6000"),
    "jpeg-bomb": (jpeg_bomb, "too large to decode safely|pixel limit"),
    "tiff-bomb": (tiff_bomb, "too large to decode safely|pixel limit"),
    "truncated-jpeg": (lambda: truncated("JPEG"), "truncated or corrupt"),
    "truncated-png": (lambda: truncated("PNG"), "truncated or corrupt"),
    "png-signature-only": (lambda: b"\x89PNG\r\n\x1a\n", "truncated or corrupt"),
    "zero-bytes": (lambda: "", "empty"),
    "three-nul-bytes": (lambda: b"\0\0\0", "not a recognised image"),
    "wrong-magic": (lambda: b"\x00\x01\x02garbage!" * 10, "not a recognised image"),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "SVG"),
    "xml-svg": (lambda: b'<?xml version="1.0"?>\n<svg><rect/></svg>', "SVG"),
    "html": (lambda: b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
    "eps": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not a recognised"),
    "not-base64": (lambda: "@@@ not base64 @@@", "not valid base64"),
}
ODD: dict[str, Callable[[], bytes]] = {
    "1x1": lambda: encode(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG"),
    "20000x20": lambda: encode(make_image(5, (20000, 20)), "PNG"),
    "20x20000": lambda: encode(make_image(6, (20, 20000)), "PNG"),
    "16-bit-grey": sixteen_bit_png,
    "cmyk-jpeg": cmyk_jpeg,
    "multi-frame-tiff": multi_frame_tiff,
    "huge-exif-and-icc": huge_exif_and_icc_jpeg,
    "palette-gif": lambda: encode(make_image(7).convert("P"), "GIF"),
}


def as_text(payload: bytes | str) -> str:
    return payload if isinstance(payload, str) else base64.b64encode(payload).decode()


def score(*images: str) -> dict[str, Any]:
    rows = [[image] for image in images]
    return {
        "input_data": {"columns": ["image"], "index": list(range(len(rows))), "data": rows},
        "params": {"max_new_tokens": 4},
    }


def peak_rss_kib(server: RunningServer) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer], controllable_model: Path) -> RunningServer:
    srv = server_factory(controllable_model, "--max-wait-ms", "0")
    # Warm the request path so the first measured request pays no one-off costs.
    httpx.post(f"{srv.url}/score", json=score(b64_png(0)), timeout=60).raise_for_status()
    return srv


@pytest.fixture(scope="module")
def memory_watch(server: RunningServer) -> dict[str, int]:
    return {"start": peak_rss_kib(server)}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_image_is_a_400_naming_the_row(
    server: RunningServer, memory_watch: dict[str, int], name: str
) -> None:
    make, reason = HOSTILE[name]
    started = time.monotonic()
    response = httpx.post(
        f"{server.url}/score", json=score(b64_png(0), as_text(make())), timeout=60
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert message.startswith("row 1: "), message
    assert re.search(reason, message), message
    assert elapsed < 10, f"{name} took {elapsed:.1f} s"


@pytest.mark.parametrize("name", list(ODD))
def test_odd_but_valid_image_gets_the_answer_for_its_pixels(
    server: RunningServer, memory_watch: dict[str, int], name: str
) -> None:
    data = ODD[name]()
    decoded = decode_image(data, ImageLimits())
    pixels = Image.frombytes("RGB", decoded.size, decoded.tobytes())  # no EXIF, ICC, info
    canonical = encode(pixels, "PNG")
    odd = httpx.post(f"{server.url}/score", json=score(as_text(data)), timeout=60)
    assert odd.status_code == 200, odd.text
    plain = httpx.post(f"{server.url}/score", json=score(as_text(canonical)), timeout=60)
    assert odd.json() == plain.json()


def test_memory_stayed_bounded(server: RunningServer, memory_watch: dict[str, int]) -> None:
    """After every hostile and odd image (run first: this module's tests run in order)."""
    grown_mib = (peak_rss_kib(server) - memory_watch["start"]) / 1024
    print(f"server peak RSS grew {grown_mib:.0f} MiB over the hostile and odd images")
    # A decoded bomb would be 180 MiB (png-bomb) to many GiB; the odd images are small.
    assert grown_mib < 120
    assert server.proc.poll() is None
