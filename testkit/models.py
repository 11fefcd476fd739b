"""Random-weight models shaped like the published checkpoints, from their non-weight files
in ``tests/data/hf-layouts`` (real config, tokenizer and processor settings)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: published checkpoints' configs, tokenizers and processor settings, without weights
LAYOUTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "hf-layouts"


def random_vision_encoder(
    layout: str, overrides: Mapping[str, Any] | None = None
) -> tuple[Any, Any]:
    """A random-weight vision encoder shaped like ``layout``'s and its processor: BLIP's
    ViT whole; BLIP-2's ViT-g at its real width with 2 of its layers.

    ``overrides`` replace fields of the vision config (e.g. a tiny ``hidden_size``); the
    processor's resize target follows ``image_size``.
    """
    import torch
    from transformers import AutoConfig, AutoProcessor, Blip2VisionModel, BlipVisionModel

    folder = LAYOUTS / layout
    config = AutoConfig.from_pretrained(folder).vision_config
    torch.manual_seed(0)
    if layout.startswith("blip2"):
        config.num_hidden_layers = 2
        # transformers initialises Blip2VisionConfig's weights with std 1e-10, so small that
        # int8 weight scales (stored in float16) round to zero; real ViT-g weights are ~1e-2
        config.initializer_range = 0.02
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    model: Any = (Blip2VisionModel if layout.startswith("blip2") else BlipVisionModel)(config)
    processor = AutoProcessor.from_pretrained(folder)
    if overrides and "image_size" in overrides:
        side = overrides["image_size"]
        processor.image_processor.size = {"height": side, "width": side}
    return model.eval(), processor
