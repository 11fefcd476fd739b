"""Ordinary photographs at their real sizes: scikit-image's samples by their function's
name (``astronaut``, ``chelsea``, ...), scikit-learn's by file name (``china.jpg``,
``flower.jpg``).  Both libraries ship the files: nothing is downloaded."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from PIL import Image

#: the photographs :func:`photos` returns, in order
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "china.jpg", "flower.jpg")


def photo(name: str) -> Image.Image:
    """The sample photograph ``name``, as an RGB image."""
    if name.endswith(".jpg"):
        datasets: Any = importlib.import_module("sklearn.datasets")  # untyped library
        pixels = datasets.load_sample_image(name)
    else:
        data: Any = importlib.import_module("skimage.data")  # untyped library
        pixels = getattr(data, name)()
    return Image.fromarray(np.asarray(pixels)).convert("RGB")


def photos() -> dict[str, Image.Image]:
    """Six colour photographs (:data:`SAMPLES`) by name, without the ``.jpg``."""
    return {name.removesuffix(".jpg"): photo(name) for name in SAMPLES}
