"""Models: a spec (:class:`~blipserve.config.ModelConfig`) built into an adapter by
:func:`build_model`, from a built-in name, a Hugging Face id or a local folder."""

from __future__ import annotations

from blipserve.models import blip, blip2, blip2_itm, instructblip  # noqa: F401  (registers the adapters)
from blipserve.models.build import build_model
from blipserve.models.protocol import Adapter
from blipserve.models.registry import ADAPTERS
from blipserve.models.source import BUILTIN_MODELS, builtin_path, resolve_source
from blipserve.types import ModelInput

__all__ = [
    "ADAPTERS",
    "BUILTIN_MODELS",
    "Adapter",
    "ModelInput",
    "build_model",
    "builtin_path",
    "resolve_source",
]
