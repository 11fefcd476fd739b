"""Proof, at build time, that the lean BLIP text layers compute what transformers' layers do.

:mod:`blipserve.models.lean_text` replaces ``BlipTextLayer.forward`` and reads the key/value
caches' internals, so a transformers release that changes either could make it compute
something else.  :func:`lean_text_refusal` runs one of the live model's text layers (its own
weights, in float32; the last one that attends to the image) through transformers' own
``BlipTextEncoder`` — once as transformers has it, once made lean — in each way the models
call it: a prompt and then one decoding step with the cache, as ``generate`` does, and
padded text without a cache, as the ITM head and VQA's question encoder do; and compares.
A fraction of a second; any difference or error is the reason the build keeps
transformers' layers (the step is reported skipped).
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
    # The last layer that attends to the image: every path, and a cache slot other than 0.
    layer = next((m for m in reversed(layers) if hasattr(m, "crossattention")), layers[-1])
    try:
        with torch.random.fork_rng(devices=[]):  # (building the lean copy draws random init)
            want = _calls(BlipTextEncoder, layer, lean=False)
            got = _calls(BlipTextEncoder, layer, lean=True)
        for (call, a), b in zip(want.items(), got.values(), strict=True):
            if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
                worst = float((a - b).abs().max())
                return f"{call}: lean layer differs from transformers' by up to {worst:.3g}"
    except Exception as exc:  # any failure means: do not trust the patch
        return f"{type(exc).__name__}: {exc}"
    return None


def _calls(encoder_cls: Any, layer: nn.Module, *, lean: bool) -> dict[str, torch.Tensor]:
    """A ``BlipTextEncoder`` holding just ``layer`` (float32, on its device; ``lean``: a
    lean copy sharing its weights), called as the models call it: a 3-token prompt of 2
    rows then one more token read with the cache, as ``generate`` decodes; and, without a
    cache, 4 tokens with padding, as the ITM head and VQA's question encoder read text.
    Its outputs by call.

    Float32 whatever the model's dtype: this checks the code's arithmetic, not rounding.
    """
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
    device = next(layer.parameters()).device
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    width, rows, prompt, n = int(config.hidden_size), 2, 3, 5
    image = image_mask = None
    if hasattr(layer, "crossattention"):
        image = randn(rows, n, int(getattr(config, "encoder_hidden_size", width)))  # (B, N, E)
        # (B, 1, 1, N) additive, every image token seen: as the models pass it (an image
        # has no padding); transformers 5.25's cross-attention drops this mask anyway
        image_mask = torch.zeros(rows, 1, 1, n, device=device)
    low = torch.finfo(torch.float32).min
    causal = torch.full((prompt, prompt), low, device=device).triu(1)
    padding = torch.zeros(rows, 1, 1, prompt + 1, device=device)  # (B, 1, 1, T + 1)
    padding[1, ..., -2:] = low  # (the second row two tokens shorter)
    out = {}
    with torch.inference_mode():
        first = encoder(
            randn(rows, prompt, width),  # (B, T, D)
            attention_mask=causal.expand(rows, 1, prompt, prompt),  # (B, 1, T, T)
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            use_cache=True,
        )
        out["prompt"] = first.last_hidden_state
        out["cached step"] = encoder(
            randn(rows, 1, width),  # (B, 1, D)
            attention_mask=torch.zeros(rows, 1, 1, prompt + 1, device=device),
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            cache=first.cache,
            use_cache=True,
        ).last_hidden_state
        out["uncached text"] = encoder(
            randn(rows, prompt + 1, width),  # (B, T + 1, D)
            attention_mask=padding,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            use_cache=False,
        ).last_hidden_state
    return out
