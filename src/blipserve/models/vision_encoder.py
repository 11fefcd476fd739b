"""The vision encoder on torch, made faster.

* :func:`set_vision_attention` — BLIP's vision encoder (``BlipAttention``) computes
  attention eagerly (matmul, scale, softmax, matmul: four passes over a (B, 12, 577, 577)
  tensor per layer); transformers has no SDPA path for it (BLIP-2's encoder does have one).
  ``sdpa``: the same arithmetic through ``scaled_dot_product_attention``, which fuses those
  passes; ``bf16``: the two products and the softmax in bfloat16 (for the int8 mode).
  Only the instance's ``forward`` is replaced; the model class is untouched.
* :func:`split_vision_batches` — the vision encoder one image at a time (under int8).
* :func:`vision_in_bf16` — its weights in bfloat16, one image at a time (on CPUs with AMX).
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional

from blipserve.models.weights import own_weights


def _qkv(module: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b, n, _ = hidden_states.shape
    qkv = module.qkv(hidden_states)  # (B, N, 3D)
    qkv = qkv.view(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    return tuple(qkv.unbind(0))  # q, k, v: each (B, heads, N, head_dim)


def _sdpa_forward(module: Any, hidden_states: torch.Tensor, **_: Any) -> tuple[torch.Tensor, None]:
    """``BlipAttention.forward`` through SDPA; attention weights are not returned."""
    b, n, d = hidden_states.shape
    q, k, v = _qkv(module, hidden_states)
    # Dropout is 0 at inference (eval), as in the eager code path.
    ctx = functional.scaled_dot_product_attention(q, k, v, scale=module.scale)  # (B, heads, N, hd)
    return module.projection(ctx.transpose(1, 2).reshape(b, n, d)), None


def _bf16_forward(module: Any, hidden_states: torch.Tensor, **_: Any) -> tuple[torch.Tensor, None]:
    """``BlipAttention.forward`` with its two products and softmax in bfloat16.

    For the float32 activations of the int8 model: torch's CPU SDPA kernel is no faster in
    bfloat16, but plain bf16 matmuls run at twice the float32 rate (577 tokens, 12 heads:
    4.8 vs 7.3 ms per layer against float32 SDPA).
    """
    b, n, d = hidden_states.shape
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(module, hidden_states))
    scores = torch.matmul(q * module.scale, k.transpose(-1, -2))  # (B, heads, N, N)
    ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, heads, N, head_dim)
    out = ctx.transpose(1, 2).reshape(b, n, d).to(hidden_states.dtype)
    return module.projection(out), None


_ATTENTION = {"sdpa": _sdpa_forward, "bf16": _bf16_forward}


def set_vision_attention(model: nn.Module, how: str) -> int:
    """How BLIP's vision attention runs: ``eager`` (transformers' own code), ``sdpa``
    (float32 through SDPA) or ``bf16`` (products in bfloat16); returns how many layers."""
    from transformers.models.blip.modeling_blip import BlipAttention

    if how != "eager" and how not in _ATTENTION:
        raise ValueError(f"unknown vision attention {how!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.__dict__.pop("forward", None)
            if how != "eager":
                module.forward = functools.partial(_ATTENTION[how], module)
            count += 1
    return count


def use_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Route BLIP vision attention through SDPA (or back, ``enabled=False``); returns count."""
    return set_vision_attention(model, "sdpa" if enabled else "eager")


def _cat(parts: list[Any]) -> Any:
    """Concatenate along the batch dimension what the chunks returned (tensors, tuples, None)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):  # hidden_states / attentions: one tensor per layer
        return tuple(_cat([p[i] for p in parts]) for i in range(len(first)))
    return first  # None


def _cast(part: Any, dtype: torch.dtype | None) -> Any:
    """What an encoder returned (tensors, tuples of them, None), floats in ``dtype``."""
    if isinstance(part, tuple):
        return tuple(_cast(p, dtype) for p in part)
    if dtype is None or not isinstance(part, torch.Tensor) or not part.is_floating_point():
        return part
    return part.to(dtype)


def _per_image_forward(
    forward: Any,
    rows: int,
    pixel_values: torch.Tensor,
    *,
    run_in: torch.dtype | None = None,
    out: torch.dtype | None = None,
    **kw: Any,
) -> Any:
    """``forward`` on ``rows`` images at a time (their pixels in ``run_in``, where given),
    the chunks' outputs joined (their floats in ``out``, where given)."""
    pixels = pixel_values if run_in is None else pixel_values.to(run_in)
    chunks = [forward(pixel_values=chunk, **kw) for chunk in torch.split(pixels, rows)]
    if isinstance(chunks[0], tuple):  # return_dict=False
        return tuple(_cast(_cat([c[i] for c in chunks]), out) for i in range(len(chunks[0])))
    parts = {key: _cast(_cat([c[key] for c in chunks]), out) for key in chunks[0]}
    return type(chunks[0])(**parts)


def split_vision_batches(
    model: nn.Module,
    rows: int = 1,
    *,
    run_in: torch.dtype | None = None,
    out: torch.dtype | None = None,
) -> None:
    """Run ``model.vision_model`` on ``rows`` images at a time, whatever the batch size
    (``run_in``, ``out``: the dtype its pixels are given in and its outputs answered in,
    where they differ from what the caller sends and expects).

    The decoder still sees the whole batch (its steps are memory-bound and gain from it);
    the vision encoder's activations (577 x 3072 float32 per image in an MLP) stay in cache
    instead of streaming through memory.
    """
    vision = cast(nn.Module, model.vision_model)
    original = type(vision).forward.__get__(vision)
    vision.forward = functools.partial(_per_image_forward, original, rows, run_in=run_in, out=out)


def vision_in_bf16(model: nn.Module, out: torch.dtype) -> None:
    """``model.vision_model``'s weights in bfloat16, in memory of their own (never views of
    a checkpoint file), run one image per call, its outputs in ``out`` (the dtype the rest
    of the model computes in, whatever the checkpoint held).

    For CPUs with AMX (:func:`~blipserve.models.precision.cpu_has_amx`), where oneDNN runs
    bfloat16 products on the tiles: faster there than int8 on AVX-512 VNNI, and closer to
    float32 (``bench/openvino_encoder.py --modes torch-int8 torch-bf16`` on a 2-core Intel
    Xeon, ``bench/results/openvino-encoder-blip2-xeon.json``): BLIP-2's ViT-g with 2 of its
    39 layers 36 against 56-59 ms an image, its photographs' features at a cosine of
    0.99997 to float32's (int8: 0.99969).  One image
    per call, because oneDNN may block a product differently by its row count, and an
    image's features must not depend on its batch.  The modules say ``keeps_dtype`` so
    that the int8 steps and :func:`~blipserve.models.weights.own_weights` leave them.
    """
    vision = cast(nn.Module, model.vision_model)
    own_weights(vision, torch.bfloat16)  # (a copy, even of a bf16 file's tensors)
    for module in vision.modules():
        setattr(module, "keeps_dtype", True)  # noqa: B010 (not a declared attribute)
    split_vision_batches(model, 1, run_in=torch.bfloat16, out=out)
