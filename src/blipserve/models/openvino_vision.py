"""The vision encoder (BLIP's ViT, BLIP-2's ViT-g) on OpenVINO, on CPUs.

On a CPU the vision encoder is most of a caption's time, and OpenVINO runs it near the
cores' matmul limit with no code of ours: the transformers module is converted once with
``openvino.convert_model`` (traced with a dynamic batch), saved as OpenVINO IR in the
user's cache under a key of its weights, configuration, input size and OpenVINO's version,
and compiled for the CPU with OpenVINO's own compiled-model cache beside it, so a second
start reads both instead of converting again.

:class:`OpenVinoVision` then stands in for ``model.vision_model``: same call, same output
type, so transformers' ``generate`` and the adapters do not change.  The torch encoder's
weights are dropped.  Precision: bfloat16 where the CPU computes it natively (OpenVINO's
own default there), float32 when the model is loaded in float32 (``--dtype float32``: the
output is then transformers' own to float rounding).  OpenVINO's CPU plugin computes each
image of a batch alike (measured: batch 8 equal to one at a time to the bit, bf16 and f32),
so batched rows still equal one-by-one rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipserve.cachedir import cache_folders
from blipserve.errors import ModelLoadError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'blipserve[openvino]'"


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
    OpenVINO's version (hashed: a few hundred MB take well under a second)."""
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


def _converted(vision: nn.Module, image_size: int) -> tuple[Any, Path | None]:
    """The encoder as an OpenVINO model, from the cache or converted now (and cached);
    and the cache folder it is in (None: no writable cache here)."""
    import openvino as ov

    key = fingerprint(vision, image_size, ov.get_version())
    core = ov.Core()
    for root in cache_folders("openvino"):
        xml = root / key / "vision.xml"
        if xml.exists():
            log.info("vision encoder: OpenVINO IR from %s", xml.parent)
            return core.read_model(xml), root
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), _eager_attention(vision):
        model = ov.convert_model(
            _Traced(vision).eval(),
            example_input=(example,),
            input=[("pixel_values", [-1, 3, image_size, image_size])],
        )
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
            log.info("vision encoder: converted to OpenVINO, cached in %s", root / key)
            return model, root
        except OSError:
            continue  # an unwritable cache folder: try the next one
    log.warning("vision encoder: no writable cache folder; converting again at each start")
    return model, None


def compile_vision(
    vision: nn.Module, image_size: int, dtype: torch.dtype, exact: bool
) -> OpenVinoVision:
    """``vision`` (a transformers vision model, float weights) compiled for this CPU;
    ``exact``: in float32, else in bfloat16 where the CPU has it; outputs in ``dtype``."""
    import openvino as ov

    from blipserve.models.base import cpu_has_native_bf16

    hint = "bf16" if not exact and cpu_has_native_bf16() else "f32"
    model, root = _converted(vision, image_size)
    settings: dict[str, str] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if root is not None:
        settings["CACHE_DIR"] = str(root / "compiled")
    try:
        compiled = ov.Core().compile_model(model, "CPU", settings)
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO could not compile the vision encoder: {exc}") from exc
    return OpenVinoVision(compiled, getattr(vision, "config", None), hint, dtype)


class OpenVinoVision(nn.Module):
    """Stands in for ``model.vision_model``: pixel values in, transformers' output out."""

    def __init__(self, compiled: Any, config: Any, precision: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.compiled = compiled
        self.config = config
        self.precision = precision  # OpenVINO's: "bf16" or "f32"
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
    model: nn.Module, image_size: int, dtype: torch.dtype, exact: bool
) -> OpenVinoVision:
    """Replace ``model.vision_model`` by its OpenVINO compilation (its weights are freed)."""
    vision = model.vision_model
    assert isinstance(vision, nn.Module)
    # Traced in float32 whatever the model's dtype (a bfloat16 model's weights, already
    # rounded, lose nothing): OpenVINO then picks the precision, and its outputs are f32.
    encoder = compile_vision(vision.float(), image_size, dtype, exact)
    model.vision_model = encoder
    return encoder


__all__ = ["INSTALL_HINT", "OpenVinoVision", "compile_vision", "unavailable", "use_openvino_vision"]
