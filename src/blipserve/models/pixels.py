"""Pixel values made on the model's device: resize and normalise as tensors.

transformers' BLIP image processor resizes each image with PIL and rescales and normalises
it with numpy, on the CPU, one image at a time: milliseconds an image, which at the
thousands of images a second a GPU captions would take many cores.  :class:`DevicePixels`
does the same arithmetic as the processor -- bicubic (or bilinear) resampling with
antialiasing, the result rounded to 8 bits as PIL's is, then ``(x / 255 - mean) / std`` --
with torch on the model's device: only the decoded 8-bit image crosses to it, from pinned
memory, without waiting.  torch's antialiased bicubic filter is Pillow's (a = -0.5), so
the two agree to within rounding: a pixel differs by at most one 8-bit level
(``tests/unit/test_pixels.py`` checks it on photographs, and that the demo model's captions
do not change).

Used where the model runs on a GPU; on a CPU the processor's own code stays (both run on
the same cores there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional

log = logging.getLogger(__name__)

#: PIL's resampling filters by number (the processors' ``resample``), as torch names them
_MODES = {2: "bilinear", 3: "bicubic"}


class DevicePixels:
    """An image processor's resize, rescale and normalise, as tensors on ``device``."""

    def __init__(
        self,
        size: tuple[int, int],
        mode: str,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ) -> None:
        self.size = size  # (height, width)
        self.mode = mode
        self.device = device
        # (1, 3, 1, 1): x * scale is the processor's rescale, then its normalisation
        self.scale = scale
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @classmethod
    def of(cls, image_processor: Any, device: torch.device) -> DevicePixels | None:
        """The tensor version of ``image_processor``; None when it does something else
        than resize to a fixed size, rescale and normalise RGB (the processor is used)."""
        size = getattr(image_processor, "size", None)
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
        mode = _MODES.get(int(getattr(image_processor, "resample", -1) or -1))
        flags = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
        if (
            not (height and width and mode)
            or not all(getattr(image_processor, flag, False) for flag in flags)
            or getattr(image_processor, "do_pad", False)
            or getattr(image_processor, "do_center_crop", False)
        ):
            return None
        return cls(
            (int(height), int(width)),
            mode,
            float(image_processor.rescale_factor),
            list(image_processor.image_mean),
            list(image_processor.image_std),
            device,
        )

    def __call__(self, images: Sequence[Image.Image], dtype: torch.dtype) -> torch.Tensor:
        """``images`` (RGB) as the model's pixel values (B, 3, height, width) in ``dtype``."""
        return torch.cat([self._one(image) for image in images]).to(dtype)

    def _one(self, image: Image.Image) -> torch.Tensor:
        rgb = np.array(image.convert("RGB"))  # (H, W, 3) uint8, a copy torch may own
        pixels = torch.from_numpy(rgb)
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        x = pixels.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W), 0..255
        height, width = self.size
        # As Pillow resamples: the width first, then the height, each pass rounded and
        # clipped to 8 bits (a bicubic filter overshoots at sharp edges; done in one pass
        # in floating point, such pixels ended up to 8 levels away from Pillow's).
        if x.shape[-1] != width:
            x = self._resize(x, (x.shape[-2], width))
        if x.shape[-2] != height:
            x = self._resize(x, (height, width))
        return (x * self.scale - self.mean) / self.std  # (1, 3, height, width)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = functional.interpolate(x, size=size, mode=self.mode, antialias=True)
        return x.round().clamp(0, 255)


def image_side(processor: Any) -> int:
    """The side, in pixels, that ``processor`` resizes images to (the smaller one)."""
    size = getattr(processor.image_processor, "size", None) or {}
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        values = [v for k, v in size.items() if k in ("height", "width", "shortest_edge")]
        if values:
            return int(min(values))
    try:
        return int(min(getattr(size, "height"), getattr(size, "width")))  # noqa: B009  (SizeDict)
    except (AttributeError, TypeError):
        log.warning("could not read the processor's image size; assuming 384")
        return 384
