"""blipserve: serve BLIP and BLIP-2 image-to-text models.

>>> from blipserve import Engine, ModelConfig                      # doctest: +SKIP
>>> with Engine.load(ModelConfig(model="demo")) as engine:          # doctest: +SKIP
...     engine.predict([RowInput(0, "examples/scene-01.png")], allow_paths=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blipserve.config import EngineConfig, FetchConfig, ImageLimits, ModelConfig
from blipserve.contracts.catalog import encode_response, parse_request
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput

if TYPE_CHECKING:
    from blipserve.engine import Engine

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EngineConfig",
    "FetchConfig",
    "GenerationParams",
    "ImageLimits",
    "ModelConfig",
    "Prediction",
    "RowInput",
    "encode_response",
    "parse_request",
]


def __getattr__(name: str) -> Any:
    # The engine imports torch and transformers: load them only when asked for.
    if name == "Engine":
        from blipserve.engine import Engine

        return Engine
    raise AttributeError(f"module 'blipserve' has no attribute {name!r}")
