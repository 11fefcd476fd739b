"""Fine-tune (or train from a config) BLIP captioning and BLIP-2 models.

>>> from blipserve.finetune import FinetuneConfig, finetune
>>> finetune(FinetuneConfig(data="scenes/", init="config:blip", output_dir="out"))  # doctest: +SKIP

``finetune`` is imported on first use: the config (and so ``blipserve finetune --help``)
must not pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blipserve.finetune.config import FinetuneConfig

if TYPE_CHECKING:
    from blipserve.finetune.train import finetune

__all__ = ["FinetuneConfig", "finetune"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from blipserve.finetune.train import finetune

        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
