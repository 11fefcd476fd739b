"""Small helpers shared by tests: images made in the test, as PNG and base64."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A reproducible RGB image with some structure (random blocks)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size[1] // 4 + 1, size[0] // 4 + 1, 1), dtype=np.uint8))
    return Image.fromarray(pixels[: size[1], : size[0]])


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64_png(seed: int = 0, *, lines: bool = False) -> str:
    data = png_bytes(make_image(seed))
    return (base64.encodebytes(data) if lines else base64.b64encode(data)).decode()


def batch_command(model: Path, images: Path, out: Path, *flags: str) -> list[str]:
    """``blipserve batch IMAGES -o OUT --model MODEL`` as a subprocess argv: short captions
    (4 tokens), no progress bar, plus ``flags``."""
    return [
        *(sys.executable, "-m", "blipserve.cli", "batch", str(images), "-o", str(out)),
        *("--model", str(model), "--max-new-tokens", "4", "--no-progress", *flags),
    ]
