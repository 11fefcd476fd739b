"""What the image-text matching adapters (BLIP's and BLIP-2's) share."""

from __future__ import annotations

from blipserve.errors import InvalidInput
from blipserve.params import GenerationParams


def one_score_per_row(params: GenerationParams) -> None:
    """A matching model gives one probability a row: several texts cannot be asked of it."""
    if (params.num_return_sequences or 1) > 1:
        raise InvalidInput(
            "num_return_sequences (n on the OpenAI route) must be 1 for this model: it "
            "scores image-text pairs, one match probability per row"
        )
