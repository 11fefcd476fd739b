"""Run `blipserve serve` with one extra adapter whose model the test can slow or break.

A tiny BLIP captioning folder whose config.json names the architecture
``ControllableBlipForConditionalGeneration`` is served by :class:`ControllableAdapter`:
the real BLIP adapter, except that a row whose text is ``sleep:SECONDS`` makes its batch
take that long first, and ``boom`` makes its batch raise. Everything else (HTTP server,
engine, batcher) is the real thing.

    python tests/integration/serve_controllable.py serve --model FOLDER ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Hashable, Sequence

from blipserve.cli import main
from blipserve.models.blip import BlipCaptionAdapter
from blipserve.models.registry import register
from blipserve.types import ModelInput, Prediction

ARCHITECTURE = "ControllableBlipForConditionalGeneration"


def _controlled(item: ModelInput) -> bool:
    """A row the tests control: ``sleep:S`` (the model sleeps S seconds) or ``boom``."""
    return bool(item.text and (item.text.startswith("sleep:") or item.text == "boom"))


@register(ARCHITECTURE)
class ControllableAdapter(BlipCaptionAdapter):
    kind = "controllable-blip"

    def check_row(self, item: ModelInput) -> None:
        if not _controlled(item):
            super().check_row(item)

    def batch_key(self, item: ModelInput) -> Hashable:
        if _controlled(item):
            return (item.text,)  # a batch of its own
        return super().batch_key(item)

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        text = items[0].text or ""
        if text == "boom":
            raise RuntimeError("injected fault")
        if text.startswith("sleep:"):
            time.sleep(float(text.split(":", 1)[1]))
            return [Prediction(f"slept {text}") for _ in items]
        return super().predict(items)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
