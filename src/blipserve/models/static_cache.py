"""Decoding with a static KV cache (``--cuda-graphs``): the shapes that make it pay.

Given a cache of fixed shapes (``StaticCache``: allocated once per call and written in
place), transformers' ``generate`` compiles the decoding step on a GPU (``torch.compile``,
mode ``reduce-overhead``: CUDA graphs), so each new token costs a graph replay instead of
hundreds of kernel launches from Python.  A compiled step is specialised to its batch and
cache shapes, so the adapters that decode this way pad batches to a power of two rows
(:func:`padded_rows`) and round cache lengths up (:func:`cache_length`): a handful of
graphs, compiled at warm-up (``Engine.warm_up``), then serve every batch.

Each call makes its cache anew, as transformers does for BLIP-2's
``cache_implementation="static"``; whether the new addresses make the CUDA graphs record
again, and what that costs, is for a GPU to tell (issue 22).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from blipserve.types import ModelInput

#: static KV cache lengths are multiples of this ...
CACHE_STEP = 64
#: ... and at least this (32 query tokens, a question and 20 new tokens fit)
CACHE_MIN = 128


def padded_rows(items: Sequence[ModelInput]) -> list[ModelInput]:
    """``items`` and copies of the last one up to the next power of two rows; the caller
    drops the copies' outputs (rows are independent, so they change nothing else)."""
    n = len(items)
    return [*items, *[items[-1]] * ((1 << (n - 1).bit_length()) - n)]


def cache_length(prompt: int, new_tokens: int) -> int:
    """Positions a static cache gets for a ``prompt`` of that many positions and
    ``new_tokens``: at least :data:`CACHE_MIN`, else a multiple of :data:`CACHE_STEP`
    (each new length compiles anew, so the usual ones share one)."""
    needed = CACHE_STEP * -(-(prompt + new_tokens) // CACHE_STEP)
    return max(CACHE_MIN, needed)


def blip_text_cache(text_config: Any, positions: int, image_tokens: int) -> Any:
    """A static cache for BLIP's text decoder: ``positions`` of self-attention and the
    image's ``image_tokens`` keys and values for the cross-attention.

    BLIP's text model is a decoder with cross-attention that transformers does not count
    as an encoder-decoder, so ``cache_implementation="static"`` would give it one
    ``StaticCache`` for both attentions (the image's keys would overwrite the text's).  Two
    static caches in an ``EncoderDecoderCache`` are what its layers expect: the first step
    writes the image's keys and values, later steps read them (``is_updated``); both keep
    their shapes and addresses, and ``generate`` compiles the steps.
    """
    from transformers.cache_utils import EncoderDecoderCache, StaticCache

    return EncoderDecoderCache(
        StaticCache(config=text_config, max_cache_len=positions),
        StaticCache(config=text_config, max_cache_len=image_tokens),
    )
