"""The vision encoder (BLIP's ViT, BLIP-2's ViT-g) on OpenVINO, on CPUs.

On a CPU the vision encoder is most of a caption's time, and OpenVINO runs it near the
cores' matmul limit with no code of ours: the transformers module is converted once with
``openvino.convert_model`` (traced with a dynamic batch), saved as OpenVINO IR in the
user's cache under a key of its weights, configuration, input size and OpenVINO's version,
and compiled for the CPU with OpenVINO's own compiled-model cache beside it, so a second
start reads both instead of converting again.

:class:`OpenVinoVision` then stands in for ``model.vision_model``: same call, same output
type, so transformers' ``generate`` and the adapters do not change.  The torch encoder's
weights are dropped.  Precision (``mode``, which
:func:`blipserve.models.precision.vision_precision` picks): float32 when the model is
loaded in float32 (``--dtype float32``: the output is then transformers' own to float
rounding); with ``--dtype int8`` one of two int8 recipes, which the model family's adapter
names (``HFAdapter.vision_int8``; :mod:`blipserve.models.openvino_int8`): ``int8-static``
(NNCF's post-training quantization of weights and activations, calibrated on images the
project generates, :mod:`blipserve.models.calibration`) or ``int8-dynamic`` (int8 weights,
NNCF's data-free compression, with activations quantized per token at run time by
OpenVINO's CPU plugin); otherwise bfloat16 where the CPU computes it natively (OpenVINO's
own default there).  Each is batch-invariant: OpenVINO's CPU plugin computes each image of
a batch alike (measured: batch 8 equal to one at a time to the bit in every mode; static
int8's activation scales are fixed at calibration, dynamic int8's are per token), so
batched rows still equal one-by-one rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipserve.cachedir import cache_folders
from blipserve.errors import ModelLoadError
from blipserve.models import openvino_int8
from blipserve.models.calibration import calibration_pixels

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'blipserve[openvino]'"


def version() -> str:
    """OpenVINO's version, for reports ("not installed" without it)."""
    try:
        import openvino as ov
    except ImportError:
        return "not installed"
    return str(ov.get_version())


def unavailable(device: torch.device) -> str | None:
    """Why the OpenVINO vision encoder cannot run here (None: it can)."""
    if device.type != "cpu":
        return f"it runs on CPUs, and this model is on {device.type}"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return f"openvino is not installed ({INSTALL_HINT})"
    return None


class _Traced(nn.Module):
    """The encoder as OpenVINO's converter sees it: pixels in, two tensors out."""

    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vision(pixel_values=pixel_values, return_dict=True)
        return out.last_hidden_state, out.pooler_output  # (B, N, D), (B, D)


def fingerprint(vision: nn.Module, image_size: int, version: str) -> str:
    """A key for the converted encoder: its weights, configuration and input size, and
    OpenVINO's version (hashed: a few hundred MB take well under a second).  An int8
    variant's key is this one and its recipe's name."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(vision, "config", None)
    described = config.to_json_string() if config is not None else type(vision).__name__
    digest.update(json.dumps([described, image_size, version, "v1"]).encode())
    for name, tensor in vision.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _eager_attention(vision: nn.Module) -> Iterator[None]:
    """Trace attention as plain matmuls and softmax (which OpenVINO fuses itself):
    transformers' SDPA path (BLIP-2's encoder) branches on shapes, which tracing cannot
    follow."""
    config = getattr(vision, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if config is None or before in (None, "eager"):
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def _cached(key: str) -> tuple[Any, Path] | None:
    """The OpenVINO model cached under ``key``, and its cache folder (None: not cached)."""
    import openvino as ov

    for root in cache_folders("openvino"):
        xml = root / key / "vision.xml"
        if xml.exists():
            log.info("vision encoder: OpenVINO IR from %s", xml.parent)
            return ov.Core().read_model(xml), root
    return None


def _store(model: Any, key: str) -> Path | None:
    """Save ``model`` under ``key`` in the first writable cache folder (None: none is)."""
    import openvino as ov

    for root in cache_folders("openvino"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
            # compress_to_fp16=False: keep float32 weights (float32 mode must stay exact)
            ov.save_model(model, work / "vision.xml", compress_to_fp16=False)
            try:
                os.rename(work, root / key)  # atomic: a folder appears whole or not at all
            except OSError:  # another process cached the same key first
                shutil.rmtree(work, ignore_errors=True)
            log.info("vision encoder: cached as OpenVINO IR in %s", root / key)
            return root
        except OSError:
            continue  # an unwritable cache folder: try the next one
    log.warning("vision encoder: no writable cache folder; converting again at each start")
    return None


def _converted(vision: nn.Module, image_size: int, key: str) -> tuple[Any, Path | None]:
    """The encoder as an OpenVINO model, from the cache under ``key`` (its
    :func:`fingerprint`) or converted now (and cached); and the cache folder it is in
    (None: no writable cache here)."""
    import openvino as ov

    cached = _cached(key)
    if cached is not None:
        return cached
    example = torch.zeros(1, 3, image_size, image_size)
    try:
        with torch.no_grad(), _eager_attention(vision):
            model = ov.convert_model(
                _Traced(vision).eval(),
                example_input=(example,),
                input=[("pixel_values", [-1, 3, image_size, image_size])],
            )
    except Exception as exc:  # the converter's errors have no common base of their own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"OpenVINO could not convert the vision encoder: {first}") from exc
    return model, _store(model, key)


def _quantized(
    vision: nn.Module, image_size: int, mode: str, image_processor: Any
) -> tuple[Any, Path | None]:
    """The encoder in int8 (``mode``: ``int8-static`` or ``int8-dynamic``), from the cache
    or made now from the float conversion (and cached)."""
    import openvino as ov

    recipe = openvino_int8.STATIC if mode == "int8-static" else openvino_int8.WEIGHTS
    floats = fingerprint(vision, image_size, ov.get_version())  # (weights hashed once)
    key = f"{floats}-{recipe}"
    cached = _cached(key)
    if cached is not None:
        return cached
    model, _ = _converted(vision, image_size, floats)
    log.info("vision encoder: %s with NNCF (once; cached afterwards)", mode)
    try:
        if mode == "int8-static":
            quantized = openvino_int8.quantize(model, calibration_pixels(image_processor))
        else:
            quantized = openvino_int8.compress_weights(model)
    except Exception as exc:  # NNCF's errors have no common base of their own
        raise ModelLoadError(f"NNCF could not quantize the vision encoder: {exc}") from exc
    return quantized, _store(quantized, key)


MODES = ("f32", "bf16", "int8-static", "int8-dynamic")


def compile_vision(
    vision: nn.Module,
    image_size: int,
    dtype: torch.dtype,
    mode: str,
    image_processor: Any = None,
) -> OpenVinoVision:
    """``vision`` (a transformers vision model, float weights) compiled for this CPU in
    ``mode`` (``f32``, ``bf16``, ``int8-static`` or ``int8-dynamic``;
    int8-static needs the model's ``image_processor`` for its calibration images); outputs
    in ``dtype``."""
    import openvino as ov

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    if mode.startswith("int8"):
        if mode == "int8-static" and image_processor is None:
            raise ValueError("int8-static needs the model's image processor (calibration)")
        if (why := int8_unavailable()) is not None:
            raise ModelLoadError(f"the int8 OpenVINO vision encoder is not available: {why}")
        model, root = _quantized(vision, image_size, mode, image_processor)
    else:
        key = fingerprint(vision, image_size, ov.get_version())
        model, root = _converted(vision, image_size, key)
    # int8: what stays in float (attention, norms, the patch embedding) computes in f32, not
    # in OpenVINO's bf16 default: int8 layers between bf16 ones ran at half the speed on one
    # image (BLIP-base's ViT, ms per image at batch 1 / 8: 256 / 137 with bf16 around the
    # int8 layers, 135 / 122 with f32; bf16 alone 202 / 174)
    hint = "bf16" if mode == "bf16" else "f32"
    settings: dict[str, str] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    # int8-dynamic: each token's activations quantized in groups of 32 (0 turns it off:
    # BLIP-base's ViT then ran its int8 weights at 338 ms per image instead of 190)
    settings["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "32" if mode == "int8-dynamic" else "0"
    if root is not None:
        settings["CACHE_DIR"] = str(root / "compiled")
    try:
        compiled = ov.Core().compile_model(model, "CPU", settings)
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO could not compile the vision encoder: {exc}") from exc
    return OpenVinoVision(compiled, getattr(vision, "config", None), mode, dtype)


def int8_unavailable() -> str | None:
    """Why the int8 encoder cannot be made here (None: it can).  Looked up, not imported:
    importing NNCF takes 1.5-2.5 s, and a cached int8 encoder never needs it."""
    # (a None in sys.modules is how an import is blocked: find_spec would raise on it)
    if sys.modules.get("nncf", sys) is None or importlib.util.find_spec("nncf") is None:
        return f"nncf is not installed ({INSTALL_HINT})"
    return None


class OpenVinoVision(nn.Module):
    """Stands in for ``model.vision_model``: pixel values in, transformers' output out."""

    def __init__(self, compiled: Any, config: Any, precision: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.compiled = compiled
        self.config = config
        self.precision = precision  # one of MODES
        self.out_dtype = dtype  # what the rest of the model computes in
        self._local = threading.local()  # an infer request per thread (they are not shared)

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **_: Any,
    ) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if output_attentions or output_hidden_states or interpolate_pos_encoding:
            raise ModelLoadError(
                "the OpenVINO vision encoder gives the last hidden state at the model's input "
                "size only; load the model with --backend torch for attentions, hidden "
                "states or other image sizes"
            )
        pixels = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        request = self._request()
        request.infer({0: pixels})
        # (B, N, D) and (B, D), copied out of the request's buffers (reused by the next call)
        last, pooled = (
            torch.from_numpy(request.get_output_tensor(i).data.copy()).to(self.out_dtype)
            for i in range(2)
        )
        if return_dict is False:
            return last, pooled
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled)


def use_openvino_vision(
    model: nn.Module,
    image_processor: Any,
    image_size: int,
    dtype: torch.dtype,
    mode: str,
) -> OpenVinoVision:
    """Replace ``model.vision_model`` by its OpenVINO compilation in ``mode`` (its weights
    are freed); its outputs in ``dtype``, the model's."""
    vision = model.vision_model
    assert isinstance(vision, nn.Module)
    # Traced in float32 whatever the model's dtype (a bfloat16 model's weights, already
    # rounded, lose nothing): OpenVINO then picks the precision, and its outputs are f32.
    encoder = compile_vision(vision.float(), image_size, dtype, mode, image_processor)
    model.vision_model = encoder
    return encoder


__all__ = [
    "INSTALL_HINT",
    "MODES",
    "OpenVinoVision",
    "compile_vision",
    "int8_unavailable",
    "unavailable",
    "use_openvino_vision",
    "version",
]
