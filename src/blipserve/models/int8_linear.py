"""int8 ``nn.Linear`` layers: int8 weights (symmetric, one scale per output channel) and
activations quantized per row at run time, on blipserve's own AVX-512 VNNI kernel
(:mod:`blipserve.models.int8_kernel`) where it builds, else fbgemm's dynamic int8 linear.

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
import warnings

import torch
from torch import nn
from torch.nn import functional

from blipserve.models import int8_kernel
from blipserve.models.memory import release_freed_memory


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products into 32-bit sums, no 16-bit saturation)."""
    flags = int8_kernel.cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, fbgemm's kernels add pairs of uint8*int8 products in 16 bits, which can
# saturate with full-range activations; torch's own dynamic Linear therefore quantizes
# activations to 7 bits ("reduce_range").  With VNNI the 8th bit is safe, and on the demo
# models it cut the captions and answers that differ from float32's by more than half
# (measured before per-row scaling: demo-vqa 3.3% -> 1.5% of 600).
_REDUCE_RANGE = not cpu_has_vnni()


def _quantized_weight(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float()  # (out, in)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,) one per output channel
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # "quantized tensor creation functions ... are deprecated": see the module docstring.
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)


def _signed_unit_input(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A normal tensor even when made under inference mode: the engine calls layers under
    # it, a user's or a test's own call may not, and an inference tensor cannot be written
    # outside it.
    with torch.inference_mode(False):
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
    by :func:`~blipserve.models.vision_encoder.split_vision_batches`), where that scale
    cannot depend on other requests.  It saves the scaling's passes over the input and
    output: BLIP-base's vision encoder 242 vs 269 ms per image (medians of 15 interleaved
    runs; batch 8: 2.06 vs 2.19 s), with its output no further from float32's (relative
    error 2.3% vs 2.4% on photos).
    """

    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, per_row: bool = True, kernel: bool = True) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()  # (in the checkpoint's dtype: models/weights.py)
        # (a copy: fbgemm's packed layer keeps the bias tensor it is given, which here may be
        # a view of the checkpoint's file; models/weights.py)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32, copy=True)
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
        weight = weight.float()
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
        if rows.requires_grad:  # (called with gradients on: none flows through int8 weights)
            rows = rows.detach()
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
    A layer that says ``keeps_dtype = True`` (a speed option made it narrower on purpose:
    :func:`~blipserve.models.vision_encoder.vision_in_bf16`) stays as it is.

    One-way (the float weights are dropped).  Tied weights (an LM head sharing the word
    embeddings) simply stop being tied: the embedding keeps its float copy.
    """
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and not getattr(child, "keeps_dtype", False)
    ]
    count = len(targets)
    while targets:
        parent, name = targets.pop()
        setattr(parent, name, Int8Linear(getattr(parent, name), per_row=per_row, kernel=kernel))
        # the float layer and its copies, freed: handed back now, not kept (fragmented
        # between the int8 weights) by the allocator (models/memory.py)
        release_freed_memory()
    return count
