"""Speed options applied to a loaded transformers model, each measured in ``bench/speed.py``.

* :func:`set_vision_attention` — BLIP's vision encoder (``BlipAttention``) computes
  attention eagerly (matmul, scale, softmax, matmul: four passes over a (B, 12, 577, 577)
  tensor per layer); transformers has no SDPA path for it (BLIP-2's encoder does have one).
  ``sdpa``: the same arithmetic through ``scaled_dot_product_attention``, which fuses those
  passes; ``bf16``: the two products and the softmax in bfloat16 (for the int8 mode).
  Only the instance's ``forward`` is replaced; the model class is untouched.
* :class:`Int8Linear` / :func:`quantize_linears` — every ``nn.Linear`` of the model with
  int8 weights (symmetric, one scale per output channel) and activations quantized per row
  at run time: blipserve's own AVX-512 VNNI kernel (:mod:`blipserve.models.int8_kernel`)
  where it builds, else fbgemm's dynamic int8 linear.
* :func:`split_vision_batches` — the vision encoder one image at a time under int8.

Why a kernel of our own: fbgemm's one-row path reads the weights at about half the memory
bandwidth, and its one scale per call needs extra passes to be batch-invariant; ours was
faster at every row count measured (the module's docstring).  Why fbgemm as the fallback
(``quantized::linear_dynamic``) rather than torchao: on the 2-core Zen 4 this was
built on (torch 2.13), torchao 0.18's eager int8 CPU paths were 1.5-9x *slower* than bf16
linears (weight-only int8: 325 vs 129 us for a 768x3072 GEMV; dynamic int8 at 577 rows:
142 vs 383 GFLOP/s), while fbgemm's dynamic linear ran at 600-690 GFLOP/s on 512-row chunks
(bf16: 330-410) and 2-9x faster than bf16 for single rows (decoding).  torch marks its
quantized tensors deprecated; if a later torch drops the ops, :func:`int8_available` says
so and loading with int8 fails with that message instead of producing wrong output.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn import functional

from blipserve.models import int8_kernel

if TYPE_CHECKING:
    from blipserve.models.base import Precision


def _has_vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products into 32-bit sums, no 16-bit saturation)."""
    flags = int8_kernel.cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, fbgemm's kernels add pairs of uint8*int8 products in 16 bits, which can
# saturate with full-range activations; torch's own dynamic Linear therefore quantizes
# activations to 7 bits ("reduce_range").  With VNNI the 8th bit is safe, and on the demo
# models it cut the captions and answers that differ from float32's by more than half
# (measured before per-row scaling: demo-vqa 3.3% -> 1.5% of 600).
_REDUCE_RANGE = not _has_vnni()


def _quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float()  # (out, in)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,) one per output channel
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # "quantized tensor creation functions ... are deprecated": see the module docstring.
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)


def _signed_unit_input(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.empty(rows, cols)
    buf[:, -2] = 1.0
    buf[:, -1] = -1.0
    return buf, buf[:, :-2]


def _scratch(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, cols) float32 input whose last two columns hold +1 and -1, and a view of
    its other columns (where the scaled rows go); one per shape and thread."""
    return int8_kernel.per_thread(
        ("fbgemm input", rows, cols), functools.partial(_signed_unit_input, rows, cols)
    )


class Int8Linear(nn.Module):
    """Drop-in for an ``nn.Linear``: int8 weights, int8 matmul, output in the input's dtype.

    Where it builds (AVX-512 VNNI, a C compiler; :mod:`blipserve.models.int8_kernel`),
    blipserve's own kernel does the work: each row quantized with its own scale, so a row's
    output is bit-identical alone or in any batch.  Otherwise torch's fbgemm kernel:

    fbgemm's dynamic linear quantizes its whole input with one (asymmetric) scale, so a row's
    result would depend on the other rows of its batch.  Each row is therefore scaled to a
    largest magnitude of 1 first and given two extra columns, +1 and -1, that meet zero
    weights: every input then spans exactly [-1, 1], the kernel picks the same scale for
    any batch, and the int32 sums are exact — a row's output is bit-identical whether it
    runs alone or in a batch (per-row quantization, measured also more accurate than one
    scale per call).  The row's magnitude is multiplied back afterwards, then the bias.

    ``per_row=False``: fbgemm's own single scale for the whole input and its fused bias, for
    layers that only ever see one image's rows (the vision encoder, run one image per call
    by :func:`split_vision_batches`), where that scale cannot depend on other requests.  It
    saves the scaling's passes over the input and output: BLIP-base's vision encoder 242
    vs 269 ms per image (medians of 15 interleaved runs; batch 8: 2.06 vs 2.19 s), with
    its output no further from float32's (relative error 2.3% vs 2.4% on photos).
    """

    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, per_row: bool = True, kernel: bool = True) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        # For model code that inspects a layer's weight (T5 skips a dtype cast when it is
        # int8): the right shape and dtype, no data (one byte, expanded).
        self.weight = torch.zeros((), dtype=torch.int8).expand(self.out_features, self.in_features)
        # blipserve's own kernel where it builds (faster at every row count measured, and
        # always one scale per row), unless told not to; else fbgemm's
        own = int8_kernel.load() if kernel else None
        self._kernel = None if own is None else own.pack(weight, bias)
        self.per_row = per_row or self._kernel is not None
        if self._kernel is not None:
            self.register_buffer("bias", None, persistent=False)  # (the kernel holds it)
            return
        if per_row:
            # (out, in + 2): zero weights for the two constant columns
            weight = functional.pad(weight, (0, 2))
        self._packed = torch.ops.quantized.linear_prepack(
            _quantized_weight(weight), None if per_row else bias
        )
        # The op itself, not its overload packet, whose Python-side dispatch checks cost
        # about as much as the kernel does for one decoding row; and below the overload's
        # own __call__ its C++ entry point (``_op``), skipping a per-call scan of the
        # arguments for fake script objects (tracing only): a 768x768 layer on one row
        # 44.8 vs 48.2 us per forward (medians of ten runs of 2000 calls).
        overload = torch.ops.quantized.linear_dynamic.default
        self._linear = getattr(overload, "_op", overload)
        self.register_buffer("bias", bias if per_row else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept to the fewest calls: a decoding step runs ~100 of these on one row each,
        # where Python and dispatch overhead rival the kernel (a 768x768 layer on one row:
        # 39 us per call, against 48 for the first version of this function; medians of
        # five interleaved runs of 2000 calls).
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if self._kernel is not None:
            done = self._kernel(rows)  # (M, out), float32, bias added
            if x.dtype != torch.float32:
                done = done.to(x.dtype)
            return done.view(*x.shape[:-1], self.out_features)
        if rows.dtype != torch.float32:
            rows = rows.float()  # the kernel takes float32
        if not self.per_row:
            whole: torch.Tensor = self._linear(rows, self._packed, _REDUCE_RANGE)  # (M, out)
            return whole.to(x.dtype).view(*x.shape[:-1], self.out_features)  # bias added
        # (abs().amax(): 20x faster here than vector_norm(inf), which does not vectorize)
        size = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)  # (M, 1); zero rows stay 0
        buf, scaled = _scratch(rows.shape[0], self.in_features + 2)
        torch.div(rows, size, out=scaled)
        out: torch.Tensor = self._linear(buf, self._packed, _REDUCE_RANGE)
        bias = self.bias
        out = out.mul_(size) if bias is None else torch.addcmul(bias, out, size)
        if x.dtype != torch.float32:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out)


@functools.cache
def int8_available(kernel: bool = True) -> str | None:
    """None when int8 linears work here (on blipserve's kernel or, failing that or without
    ``kernel``, fbgemm's), else why not (for the load error)."""
    if kernel and int8_kernel.load() is not None:
        return None
    try:
        layer = Int8Linear(nn.Linear(4, 3), kernel=False)
        layer(torch.ones(2, 4))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"this torch build has no usable quantized::linear_dynamic ({exc})"
    return None


def quantize_linears(model: nn.Module, per_row: bool = True, kernel: bool = True) -> int:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int8Linear`; returns how many.

    One-way (the float weights are dropped).  Tied weights (an LM head sharing the word
    embeddings) simply stop being tied: the embedding keeps its float copy.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child, per_row=per_row, kernel=kernel))
    return len(targets)


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
        x = _attend(q, k, v, encoder_attention_mask)
        hidden = _add_norm(layer.crossattention.output, x, hidden)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    return _add_norm(layer.output, inner, hidden)


def _image_keys_values(
    cross: Any, states: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention's keys and values of the image tokens ``states`` (B, N, E): each
    (B, H, N, hd), contiguous (a decoding step then reads them as one block per head).

    ``cross.kv`` computes both (:func:`_fused`); in int8 it runs one image per call
    (``cross.kv_rows = 1``, :func:`prepare`): 577 rows of an image stay in cache where a
    batch's thousands stream through memory, and fbgemm's whole-input scale then belongs
    to one image, so its keys do not depend on its batch.
    """
    b, n, _ = states.shape
    width = cross.kv.out_features // 2
    keys = states.new_empty(b, width // head_dim, n, head_dim)
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
    Call before :func:`quantize_linears` (the fused Linear is then quantized like any other;
    per-output-channel scales make it bit-identical to three int8 layers).
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
    1168 ms; with :func:`keep_freed_memory` 20 tokens 1162 vs 1280 ms (another, slower
    hour).  The demo model's captions stay those of float32 (100% of 200 held-out scenes).
    """
    count = 0
    for module in model.modules():
        kv = getattr(module, "kv", None)
        if type(kv) is nn.Linear and hasattr(module, "layer_idx"):
            module.kv = Int8Linear(kv, per_row=False, kernel=kernel)
            module.__dict__["kv_rows"] = 1  # (a plain attribute, not a submodule)
            count += 1
    return count


def _cat(parts: list[Any]) -> Any:
    """Concatenate along the batch dimension what the chunks returned (tensors, tuples, None)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):  # hidden_states / attentions: one tensor per layer
        return tuple(_cat([p[i] for p in parts]) for i in range(len(first)))
    return first  # None


def _per_image_forward(forward: Any, rows: int, pixel_values: torch.Tensor, **kw: Any) -> Any:
    chunks = [forward(pixel_values=chunk, **kw) for chunk in torch.split(pixel_values, rows)]
    if isinstance(chunks[0], tuple):  # return_dict=False
        return tuple(_cat([c[i] for c in chunks]) for i in range(len(chunks[0])))
    return type(chunks[0])(**{key: _cat([c[key] for c in chunks]) for key in chunks[0]})


def split_vision_batches(model: nn.Module, rows: int = 1) -> None:
    """Run ``model.vision_model`` on ``rows`` images at a time, whatever the batch size.

    The decoder still sees the whole batch (its steps are memory-bound and gain from it);
    the vision encoder's activations (577 x 3072 float32 per image in an MLP) stay in cache
    instead of streaming through memory.
    """
    vision = cast(nn.Module, model.vision_model)
    original = type(vision).forward.__get__(vision)
    vision.forward = functools.partial(_per_image_forward, original, rows)


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back
    to the kernel; whether it could (False off glibc).  Process-wide, set once.

    Inference allocates and frees the same large tensors over and over (a BLIP-base layer's
    activations for one image are 2-8 MB; a batch's image keys and values 14 MB per layer),
    and by default glibc maps blocks that large afresh each time: every 4 KiB page then
    costs a page fault on first touch, which on this VM came to ~1 ms per 14 MB tensor.
    Measured on BLIP-base int8, batch 8, in two alternations of fresh processes: vision
    encoder 2.09-2.12 vs 2.25-2.28 s, first decoding step 297-307 vs 430-440 ms, 20 tokens
    975-984 vs 1070-1166 ms.  The price: the process keeps its peak memory instead of
    shrinking after a burst.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # 32 MiB is glibc's largest mmap threshold on 64-bit systems.
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return bool(ok)


def prepare(model: nn.Module, precision: Precision, device: torch.device) -> None:
    """The speed options a loaded model gets, as measured (README, Speed).

    BLIP's vision attention: SDPA for float32 on a CPU, where BLIP-base's vision encoder ran
    20% faster with it (median 297 vs 370 ms per image, six interleaved runs), while in
    bfloat16 torch's CPU kernel was slower than the eager code at batch 8 (1.79 vs 1.92
    images/s, medians of three passes); on a GPU it is not measured yet.  In int8 mode, on
    a CPU with native bf16, its products in bfloat16 instead (batch 8: 2.39 vs 2.29 images/s
    with float32 SDPA, medians of three interleaved passes of ``bench/speed.py``; the demo
    model's captions stay those of float32).
    """
    from blipserve.models.base import cpu_has_native_bf16

    cpu_float32 = device.type == "cpu" and precision.dtype == torch.float32
    if device.type == "cpu":
        keep_freed_memory()
        # BLIP-base int8, one image, 20 tokens: generate 613 vs 662 ms with transformers'
        # layers (medians of 7 interleaved runs); batch 8: no difference (3.43 vs 3.42 s).
        # Not measured on a GPU yet, where per-call overhead matters at least as much.
        lean_text_layers(model)  # before quantizing: its fused Linear is quantized too
    if cpu_float32 and precision.int8 and cpu_has_native_bf16():
        set_vision_attention(model, "bf16")
    else:
        set_vision_attention(model, "sdpa" if cpu_float32 else "eager")
    if precision.int8:
        own = precision.int8_kernel == "blipserve"  # (else fbgemm)
        vision = getattr(model, "vision_model", None)
        if isinstance(vision, nn.Module) and any(True for _ in vision.parameters()):
            # (a vision encoder without parameters runs on OpenVINO)
            # Measured on BLIP-base, batch 8: 272 ms per image one at a time vs 330-390 in
            # one call (the float32 activations of 8 images stream through memory).
            split_vision_batches(model, rows=1)
            # ... so its layers see one image at a time: one scale per image (Int8Linear).
            quantize_linears(cast(nn.Module, model.vision_model), per_row=False, kernel=own)
        # Likewise the image's keys and values in the text decoder's cross-attention.
        quantize_image_keys_values(model, kernel=own)
        quantize_linears(model, kernel=own)
