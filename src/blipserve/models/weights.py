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

So an int8 model loads in the checkpoint's own dtype (:func:`load_dtype`, from the files'
headers; every weight a view of the file), its layers are quantized one at a time from
those views (:func:`~blipserve.models.int8_linear.quantize_linears`), and
then :func:`own_weights` copies what remains into the process's memory in the model's compute
dtype, one tensor at a time, which releases the file.  ``bench/load_memory.py`` measures it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipserve.models.precision import Precision


def load_dtype(precision: Precision, source: str, revision: str | None = None) -> torch.dtype:
    """The dtype to load a model's weights in for ``precision``.

    int8: the dtype the checkpoint's floating tensors are stored in, where they all share
    one (read from the ``.safetensors`` headers, of a local folder or the Hugging Face
    cache), so that nothing is converted before it is quantized; :func:`own_weights`
    converts what stays afterwards.  A checkpoint of mixed dtypes (a float32 Q-Former in a
    bfloat16 file), or one not on disk yet or not in safetensors, loads in float32 as
    before: nothing is rounded on the way.  A float dtype: that dtype (transformers
    converts each tensor as it reads it).
    """
    if not precision.int8:
        return precision.dtype
    stored = stored_dtypes(source, revision)
    return next(iter(stored)) if len(stored) == 1 else precision.dtype


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtypes(source: str, revision: str | None = None) -> set[torch.dtype]:
    """The dtypes of the floating tensors in ``source``'s safetensors checkpoint (a folder
    or a Hugging Face id in the local cache); empty where that cannot be told (no such
    files here, another format, a floating dtype other than float32/16 and bfloat16)."""
    files = _checkpoint_files(source, revision)
    found: set[torch.dtype] = set()
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return set()
        for name, entry in header.items():
            kind = entry.get("dtype", "") if name != "__metadata__" else ""
            if kind in _DTYPES:
                found.add(_DTYPES[kind])
            elif kind.startswith("F"):  # (F64, F8_*: not what this loads; stay safe)
                return set()
    return found


def _checkpoint_files(source: str, revision: str | None) -> list[Path]:
    """The ``.safetensors`` files of ``source``, all of them, or none."""

    def find(name: str) -> Path | None:
        if Path(source).is_dir():
            path = Path(source) / name
            return path if path.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, name, revision=revision)
        return Path(cached) if isinstance(cached, str) else None

    index = find("model.safetensors.index.json")
    if index is None:
        single = find("model.safetensors")
        return [single] if single is not None else []
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return []
    paths = [find(str(name)) for name in sorted(shards)]
    return [p for p in paths if p is not None] if all(paths) else []


def settle_config_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Record ``dtype`` as the dtype of ``model``'s configuration and its parts' (loaded in
    the checkpoint's dtype, they said that one; the OpenVINO cache key hashes the vision
    configuration, which must not depend on the file's dtype)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "dtype"):
            config.dtype = dtype


def own_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Every floating parameter and buffer of ``model`` that is on the CPU, copied into
    memory of this process's own in ``dtype`` (one tensor at a time: the copy of one
    tensor is the most this adds), so that none is a view of a memory-mapped checkpoint
    any longer; returns how many bytes were copied.

    Tensors shared between modules (tied weights) stay shared: each is copied once.  A
    module that says ``keeps_dtype = True`` (one a speed option made in a narrower dtype
    on purpose, in memory of its own) is left as it is.
    """
    # Where each tensor is held, grouped by tensor (ids taken while the modules hold them
    # all); then each group is copied once and the old tensor let go before the next.
    places: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for module in model.modules():
        if getattr(module, "keeps_dtype", False):
            continue
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
