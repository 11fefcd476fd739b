"""Calibration images for int8 quantization, generated here rather than shipped.

Post-training int8 needs a few inputs whose activations look like those of real use.
Photographs would do best, but the project ships none (their licences vary, and the
package would grow); what it makes instead is colour noise with a natural image's power
spectrum: amplitude falling as 1/f (the average photograph's, with an exponent near 1),
correlated colour channels, full contrast range; and, as many, flat-coloured shapes on a
plain background (what noise lacks: uniform regions and sharp edges).  On BLIP-base's ViT
(random weights, full size), worst feature cosine to float32 over six photographs with
:func:`blipserve.models.openvino_int8.quantize`'s recipe, by calibration set:
16 noise images 0.99890 (0.99875 with another seed); 8 noise + 8 of the demo's scenes
0.99955; 8 noise + 8 of the shapes below (what is used) 0.99952; twelve photographs 0.99936
(bench/results/openvino-int8-trials.txt).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: images per calibration set (NNCF's statistics converge well before: the recipe was
#: measured with 12-16)
COUNT = 16


def pink_noise(rng: np.random.Generator, side: int = 512) -> Image.Image:
    """A ``side`` x ``side`` RGB image whose spectrum falls as 1/f^a (a in [0.8, 1.2])."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    radius = np.maximum(np.sqrt(fy**2 + fx**2), 1.0 / side)  # (side, side // 2 + 1)
    amplitude = radius ** -rng.uniform(0.8, 1.2)
    channels = [
        np.fft.irfft2(
            amplitude * np.exp(1j * rng.uniform(0, 2 * np.pi, amplitude.shape)), s=(side, side)
        )
        for _ in range(3)
    ]
    pixels = np.stack(channels, axis=-1) @ rng.normal(0.6, 0.3, (3, 3))  # mixed channels
    pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-12)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def shapes(rng: np.random.Generator, side: int = 512) -> Image.Image:
    """One to four flat-coloured ellipses, boxes and triangles on a plain background."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, side * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(side // 10, side // 2, 2))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x, y + h), (x + w, y + h), (x + w // 2, y)], fill=colour)
    return image


def calibration_pixels(image_processor: Any, count: int = COUNT, seed: int = 0) -> list[Any]:
    """``count`` generated images (half noise, half shapes) through the model's own
    ``image_processor``: one-image pixel batches, (1, 3, S, S) float32 arrays, the same on
    every run."""
    rng = np.random.default_rng(seed)
    images = [pink_noise(rng) if i % 2 == 0 else shapes(rng) for i in range(count)]
    return [image_processor(images=im, return_tensors="np")["pixel_values"] for im in images]


__all__ = ["COUNT", "calibration_pixels", "pink_noise", "shapes"]
