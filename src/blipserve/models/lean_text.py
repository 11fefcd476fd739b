"""BLIP's text layers made lean for inference, and the image's keys and values in int8.

:func:`lean_text_layers` gives each ``BlipTextLayer`` (BLIP's text encoder and decoder)
a forward with the same arithmetic and a quarter of the module calls;
:func:`quantize_image_keys_values` then puts its cross-attention's keys and values of the
image in int8, one image per call.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional

from blipserve.models.int8_linear import Int8Linear


def _fused(*parts: nn.Linear) -> nn.Linear:
    """One Linear computing what ``parts`` compute (its output: theirs concatenated), so
    that one weight pass and one call do the work of several: a self-attention's query, key
    and value; a cross-attention's key and value."""
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts))
    fused.to(device=parts[0].weight.device, dtype=parts[0].weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))  # (sum of outs, in)
        fused.bias.copy_(torch.cat([p.bias for p in parts]))  # (sum of outs,)
    return fused


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)  # (B, T, D) -> (B, H, T, hd)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """BlipTextSelfAttention's arithmetic, in its order: (q k^T) / sqrt(hd) + mask, softmax,
    times v; returns (B, T, H * hd)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores + mask
    ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, T, hd)
    return ctx.transpose(1, 2).flatten(2)


def _attend_narrow(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention to keys and values held in ``k``'s dtype (bfloat16): SDPA in that dtype,
    the context back in ``q``'s; returns (B, T, H * hd)."""
    low = None if mask is None else mask.to(k.dtype)
    ctx = functional.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=low)
    return ctx.to(q.dtype).transpose(1, 2).flatten(2)  # (B, T, H * hd)


def _add_norm(out: Any, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """BlipTextSelfOutput / BlipTextOutput at inference: LayerNorm(dense(x) + residual)."""
    norm = out.LayerNorm
    return functional.layer_norm(
        out.dense(x) + residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps
    )


def _lean_text_layer(
    layer: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **_: Any,
) -> torch.Tensor:
    """``BlipTextLayer.forward`` at inference, with its ~28 module calls made 7.

    The same arithmetic in the same order as transformers' layer (self-attention with the
    key/value cache, cross-attention to the image whose keys/values are computed on the
    first step and reused, feed-forward; post-LayerNorm residuals), minus what costs time
    but does nothing at inference: dropout modules, ``apply_chunking_to_forward`` (which
    inspects its function's signature on every call), the deprecation wrappers, and three
    query/key/value calls where one fused call does (:func:`_fused`; the cross-attention's
    key and value likewise).
    """
    from transformers.cache_utils import EncoderDecoderCache

    if layer.training:
        raise RuntimeError("blipserve's inference-only BLIP text layers cannot train")
    attention = layer.attention.self
    head_dim = attention.attention_head_size
    encdec = isinstance(cache, EncoderDecoderCache)
    # Self-attention (causal mask and padding come in ``attention_mask``).
    q, k, v = (_heads(t, head_dim) for t in attention.qkv(hidden_states).chunk(3, dim=-1))
    if cache is not None:
        own = cache.self_attention_cache if encdec else cache
        k, v = own.update(k, v, attention.layer_idx)
    hidden = _add_norm(layer.attention.output, _attend(q, k, v, attention_mask), hidden_states)
    if encoder_hidden_states is not None:
        cross = layer.crossattention.self
        idx = cross.layer_idx
        q = _heads(cross.query(hidden), head_dim)
        stored = cache.cross_attention_cache if encdec else cache
        if encdec and cache.is_updated.get(idx):
            k, v = stored.layers[idx].keys, stored.layers[idx].values
        else:  # (first step) the image's keys and values: (B, H, image tokens, hd)
            k, v = _image_keys_values(cross, encoder_hidden_states, head_dim)
            if cache is not None:
                k, v = _store(stored, idx, k, v)
                if encdec:
                    cache.is_updated[idx] = True
        if k.dtype == q.dtype:
            x = _attend(q, k, v, encoder_attention_mask)
        else:  # the image's keys and values kept in a narrower dtype (keep_image_keys_values_in)
            x = _attend_narrow(q, k, v, encoder_attention_mask)
        hidden = _add_norm(layer.crossattention.output, x, hidden)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    return _add_norm(layer.output, inner, hidden)


def _image_keys_values(
    cross: Any, states: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention's keys and values of the image tokens ``states`` (B, N, E): each
    (B, H, N, hd), contiguous (a decoding step then reads them as one block per head).

    ``cross.kv`` computes both (:func:`_fused`); in int8 it runs one image per call
    (``cross.kv_rows = 1``, :func:`quantize_image_keys_values`): 577 rows of an image stay
    in cache where a batch's thousands stream through memory, and fbgemm's whole-input
    scale then belongs to one image, so its keys do not depend on its batch.
    """
    b, n, _ = states.shape
    width = cross.kv.out_features // 2
    dtype = getattr(cross, "kv_dtype", states.dtype)  # (keep_image_keys_values_in)
    keys = states.new_empty(b, width // head_dim, n, head_dim, dtype=dtype)
    values = torch.empty_like(keys)
    rows = getattr(cross, "kv_rows", b)
    for i in range(0, b, rows):
        k, v = cross.kv(states[i : i + rows]).split(width, dim=-1)  # (rows, N, D) each
        keys[i : i + rows] = _heads(k, head_dim)
        values[i : i + rows] = _heads(v, head_dim)
    return keys, values


def _store(stored: Any, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[Any, Any]:
    """Put the image's keys and values in the cross-attention cache, without the copy that
    ``DynamicLayer.update`` makes (it concatenates them to an empty tensor): 28 MB per
    layer for a batch of 8 images."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(stored, "layers", ())
    layer = layers[idx] if idx < len(layers) else None
    # Only a fresh, exactly-DynamicLayer layer (a subclass may store differently).
    if (
        not isinstance(layer, DynamicLayer)
        or type(layer) is not DynamicLayer
        or (layer.is_initialized)
    ):
        return cast(tuple[Any, Any], stored.update(k, v, idx))
    layer.lazy_initialization(k, v)
    layer.keys, layer.values = k, v
    return k, v


def lean_text_layers(model: nn.Module) -> int:
    """Give every BLIP text layer of ``model`` :func:`_lean_text_layer` as its forward (and
    its self-attention one fused query/key/value Linear); returns how many layers.

    For inference only: the self-attention's separate ``query``/``key``/``value`` are
    replaced by ``qkv``, so the layer no longer trains or runs transformers' own forward.
    Call before :func:`~blipserve.models.int8_linear.quantize_linears` (the fused Linear is
    then quantized like any other; per-output-channel scales make it bit-identical to three
    int8 layers).
    """
    from transformers.models.blip.modeling_blip_text import BlipTextLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BlipTextLayer) and "forward" not in module.__dict__:
            attention = module.attention.self
            attention.qkv = _fused(attention.query, attention.key, attention.value)
            del attention.query, attention.key, attention.value
            cross = getattr(module, "crossattention", None)
            if cross is not None:
                cross.self.kv = _fused(cross.self.key, cross.self.value)
                del cross.self.key, cross.self.value
            module.forward = functools.partial(_lean_text_layer, module)
            count += 1
    return count


def quantize_image_keys_values(model: nn.Module, kernel: bool = True) -> int:
    """In each lean BLIP text layer (:func:`lean_text_layers`), the cross-attention's fused
    key/value Linear in int8 with one activation scale per image, run one image per call
    (:func:`_image_keys_values`); returns how many layers.

    On the first decoding step these layers take a whole batch's image tokens (8 x 577
    rows at batch 8), where per-row scaling's extra passes over 14 MB tensors cost a third
    of the int8 matmul.  BLIP-base, batch 8, against separate per-row key and value
    layers (medians of 7 interleaved runs): first step 374 vs 483 ms, 20 tokens 1062 vs
    1168 ms; with :func:`~blipserve.models.memory.keep_freed_memory` 20 tokens 1162 vs
    1280 ms (another, slower hour).  The demo model's captions stay those of float32 (100%
    of 200 held-out scenes).
    """
    layers = _float_image_key_value_layers(model)
    for module, kv in layers:
        module.kv = Int8Linear(kv, per_row=False, kernel=kernel)
        module.__dict__["kv_rows"] = 1  # (a plain attribute, not a submodule)
    return len(layers)


def _float_image_key_value_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """The cross-attentions of ``model``'s lean BLIP text layers whose fused key/value
    Linear (:func:`lean_text_layers`) is still a plain float ``nn.Linear``, each with it."""
    return [
        (module, kv)
        for module in model.modules()
        if type(kv := getattr(module, "kv", None)) is nn.Linear and hasattr(module, "layer_idx")
    ]


class Bf16Linear(nn.Linear):
    """A Linear with bfloat16 weights that takes any float input and answers in bfloat16
    (a distinct class: :func:`~blipserve.models.int8_linear.quantize_linears` leaves it;
    ``keeps_dtype``: so does :func:`~blipserve.models.weights.own_weights`)."""

    keeps_dtype = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x.to(self.weight.dtype), self.weight, self.bias)


def project_image_keys_values_in_bf16(model: nn.Module) -> int:
    """In each lean BLIP text layer (:func:`lean_text_layers`), the cross-attention's fused
    key/value Linear in bfloat16, run one image per call (so that an image's keys never
    depend on its batch: oneDNN may block a product differently by its row count); returns
    how many layers.  Where its keys and values are then kept is
    :func:`keep_image_keys_values_in`'s to say (without it, in the model's dtype).

    For CPUs with AMX (:func:`~blipserve.models.precision.cpu_has_amx`), where oneDNN runs
    this product on the tiles: the first decoding step of a batch of 8 images projects
    8 x 577 image tokens in each of 12 layers (65 G multiply-adds in BLIP-base).  With it
    that step took 18 instead of 31 ms an image (BLIP-base, int8 with OpenVINO's encoder,
    medians of 3 interleaved passes of ``bench/speed.py``).  Before
    :func:`quantize_image_keys_values`, which then leaves these layers alone.
    """
    layers = _float_image_key_value_layers(model)
    for module, kv in layers:
        shape = (kv.in_features, kv.out_features)
        narrow = Bf16Linear(*shape, device=kv.weight.device, dtype=torch.bfloat16)
        with torch.no_grad():
            narrow.weight.copy_(kv.weight)
            narrow.bias.copy_(kv.bias)
        module.kv = narrow
        module.__dict__["kv_rows"] = 1  # (a plain attribute, read per call)
    return len(layers)


def keep_image_keys_values_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """In each lean BLIP text layer (:func:`lean_text_layers`), keep the cross-attention's
    keys and values of the image in ``dtype`` and attend to them with SDPA in it; returns
    how many layers.

    A decoding step reads every layer's image keys and values: at 8 rows, 12 layers x 2 x
    (8 x 577 x 768) float32 values, 340 MB a step against the 123 MB of BLIP-base's int8
    weights, so the two products with them took about half of a step (15.7 of 32.5 ms,
    torch's profiler).  In bfloat16 (int8 mode, CPUs with native bf16) a step at 8 rows
    took 24.5 instead of 33.4 ms, at 1 row 11.1 instead of 12.5 (medians of 5 interleaved
    pairs, 1 vs 20 tokens through the engine); the demo model's captions stay float32's
    for 99.0% of 200 held-out scenes, as without it.
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "kv", None), nn.Module) and hasattr(module, "layer_idx"):
            module.__dict__["kv_dtype"] = dtype  # (a plain attribute, read per call)
            count += 1
    return count
