"""Loading weights without holding the model twice.

transformers reads a ``.safetensors`` checkpoint through a memory map: a tensor loaded in
the dtype it is stored in is a view of the file (no copy), one loaded in another dtype is
converted into the process's own memory.  Two consequences for a model that blipserve then
quantizes to int8:

* loaded in float32 from a float16 or bfloat16 checkpoint, every weight is first
  materialised in float32, twice the checkpoint, only for most of it to be quantized and
  freed a moment later: the process peaks at several times the size it ends at;
* loaded as views of the file, the weights that stay (embeddings, norms, what is not
  quantized) keep the whole file mapped for the life of the process, and every page read
  while quantizing stays in its resident memory (page cache, but counted as the process's).

So an int8 model loads in the checkpoint's own dtype (:func:`load_dtype`: ``"auto"``, the
dtype its ``config.json`` records; every weight a view of the file), its layers are quantized
one at a time from those views (:func:`~blipserve.models.int8_linear.quantize_linears`), and
then :func:`own_weights` copies what remains into the process's memory in the model's compute
dtype, one tensor at a time, which releases the file.  ``bench/load_memory.py`` measures it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blipserve.models.precision import Precision


def load_dtype(precision: Precision) -> torch.dtype | str:
    """The dtype to load a model's weights in for ``precision``.

    int8: the checkpoint's own (``"auto"``), so that nothing is converted before it is
    quantized; :func:`own_weights` converts what stays afterwards.  A float dtype: that
    dtype (transformers converts each tensor as it reads it).
    """
    return "auto" if precision.int8 else precision.dtype


def own_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Every floating parameter and buffer of ``model`` that is on the CPU, copied into
    memory of this process's own in ``dtype`` (one tensor at a time: the copy of one
    tensor is the most this adds), so that none is a view of a memory-mapped checkpoint
    any longer; returns how many bytes were copied.

    Tensors shared between modules (tied weights) stay shared: each is copied once.
    """
    # Where each tensor is held, grouped by tensor (ids taken while the modules hold them
    # all); then each group is copied once and the old tensor let go before the next.
    places: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu":
                    continue
                if tensor.is_floating_point():
                    places.setdefault(id(tensor), []).append((table, name))
    total = 0
    for group in places.values():
        table, name = group[0]
        copy = _owned(table[name], dtype)
        for table, name in group:
            table[name] = copy
        total += copy.numel() * copy.element_size()
    return total


def _owned(tensor: Any, dtype: torch.dtype) -> Any:
    """``tensor`` (a parameter or a buffer) with its data copied into new memory in ``dtype``."""
    data = tensor.detach().to(dtype=dtype, copy=True)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad)
    return data
