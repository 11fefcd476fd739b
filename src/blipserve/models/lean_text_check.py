"""Proof, at build time, that the lean BLIP text layers compute what transformers' layers do.

:mod:`blipserve.models.lean_text` replaces ``BlipTextLayer.forward`` and reads the key/value
caches' internals, so a transformers release that changes either could make it compute
something else.  :func:`lean_text_refusal` runs one of the live model's text layers (its own
weights, in float32) twice through transformers' own ``BlipTextEncoder`` — once as
transformers has it, once made lean — over a prompt and then one decoding step with the
cache, as ``generate`` calls it, and compares the two.  A few milliseconds; any difference
or error is the reason the build keeps transformers' layers (the step is reported skipped).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from blipserve.models.lean_text import lean_text_layers

#: ``BlipTextLayer.forward``'s parameters as the lean forward takes them; another list means
#: transformers changed how its encoder calls a layer
LAYER_PARAMETERS = (
    "self",
    "hidden_states",
    "encoder_hidden_states",
    "attention_mask",
    "encoder_attention_mask",
    "cache",
    "kwargs",
)
#: float32 on both sides: the same arithmetic agrees to rounding (fused projections sum in
#: another order), a wrong one by far more
RTOL = ATOL = 1e-4


def lean_text_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s BLIP text layers must stay transformers' (None: the lean ones compute
    the same; also None when the model has none to replace)."""
    from transformers.models.blip.modeling_blip_text import BlipTextEncoder, BlipTextLayer

    layers = [m for m in model.modules() if type(m) is BlipTextLayer]
    if not layers:
        return None
    found = tuple(inspect.signature(BlipTextLayer.forward).parameters)
    if found != LAYER_PARAMETERS:
        return f"transformers' BlipTextLayer.forward takes {found}, not {LAYER_PARAMETERS}"
    # A decoder layer (cross-attention to the image) exercises every path when there is one.
    layer = next((m for m in layers if hasattr(m, "crossattention")), layers[0])
    try:
        want = _two_steps(BlipTextEncoder, layer, lean=False)
        got = _two_steps(BlipTextEncoder, layer, lean=True)
        for step, (a, b) in enumerate(zip(want, got, strict=True)):
            if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
                worst = float((a - b).abs().max())
                return f"step {step}: lean layer differs from transformers' by up to {worst:.3g}"
    except Exception as exc:  # any failure means: do not trust the patch
        return f"{type(exc).__name__}: {exc}"
    return None


def _two_steps(encoder_cls: Any, layer: nn.Module, *, lean: bool) -> list[torch.Tensor]:
    """A ``BlipTextEncoder`` holding just ``layer`` (float32; ``lean``: a lean copy sharing
    its weights): its outputs for a 3-token prompt of 2 rows, then for one more token read
    with the cache."""
    config: Any = layer.config
    one_layer = copy.copy(config)
    one_layer.num_hidden_layers = 1
    with torch.device("meta"):  # (its one layer's modules are made, and thrown away)
        encoder = encoder_cls(one_layer)
    encoder.config = config  # (all its layers: the cache has a slot at the layer's index)
    if next(layer.parameters()).dtype != torch.float32:
        layer = copy.deepcopy(layer).float()
    if lean:  # a copy of the modules that shares the weights (lean_text_layers reads them)
        layer = copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})
    encoder.layer = nn.ModuleList([layer])
    if lean:
        lean_text_layers(encoder)
    generator = torch.Generator().manual_seed(0)
    width = int(config.hidden_size)
    rows, prompt = 2, 3
    image = None
    if hasattr(layer, "crossattention"):
        image_width = int(getattr(config, "encoder_hidden_size", width))
        image = torch.randn(rows, 5, image_width, generator=generator)  # (B, N, E)
    causal = torch.full((prompt, prompt), torch.finfo(torch.float32).min).triu(1)
    outputs = []
    with torch.inference_mode():
        first = encoder(
            torch.randn(rows, prompt, width, generator=generator),  # (B, T, D)
            attention_mask=causal.expand(rows, 1, prompt, prompt),  # (B, 1, T, T)
            encoder_hidden_states=image,
            use_cache=True,
        )
        outputs.append(first.last_hidden_state)
        second = encoder(
            torch.randn(rows, 1, width, generator=generator),  # (B, 1, D)
            attention_mask=torch.zeros(rows, 1, 1, prompt + 1),  # (B, 1, 1, T + 1)
            encoder_hidden_states=image,
            cache=first.cache,
            use_cache=True,
        )
        outputs.append(second.last_hidden_state)
    return outputs
