"""bench/speed.py's models: random weights in float32 built from a published layout, and
blipserve's adapter over them in each mode (a dtype, int8, BLIP's vision attention one way,
the encoder on OpenVINO), as blipserve loads them; their memory."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from common import QUICK_BLIP, QUICK_BLIP2, SEED, _merge

from testkit.models import LAYOUTS

if TYPE_CHECKING:
    from blipserve.models.base import HFAdapter


QUICK = {"blip-image-captioning-base": QUICK_BLIP, "blip2-opt-2.7b": QUICK_BLIP2}


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(layout: str, quick: bool, device: Any) -> tuple[Any, Any]:
    """A random-weight model of ``layout``'s architecture, built on ``device`` in float32."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    folder = LAYOUTS / layout
    config = AutoConfig.from_pretrained(folder)
    if quick:
        config = type(config).from_dict(_merge(config.to_dict(), QUICK[layout]))
    processor = AutoProcessor.from_pretrained(folder)
    if quick:
        side = config.vision_config.image_size
        processor.image_processor.size = {"height": side, "width": side}
    model_cls = getattr(transformers, (config.architectures or [""])[0])
    torch.manual_seed(SEED)
    with torch.device(device):
        model = model_cls(config)
    return model.to(device=device, dtype=torch.float32).eval(), processor


def make_adapter(
    adapter_cls: type[HFAdapter], model: Any, processor: Any, device: Any, mode: str, copy: bool
) -> Any:
    """``model`` (float32) prepared as ``mode`` (``auto``, a dtype or ``int8``, as blipserve
    loads it; ``-eager`` / ``-sdpa`` / ``-bf16`` force BLIP's vision attention one way;
    ``+ov``: the vision encoder on OpenVINO, as ``--backend openvino`` loads it); on a
    ``copy`` of it, or converting ``model`` itself.
    """
    import copy as copying

    from blipserve.models import openvino_vision, optimize, vision_encoder
    from blipserve.models.pixels import image_side
    from blipserve.models.precision import resolve_precision, vision_precision

    mode, ov, _ = mode.partition("+ov")
    name, _, variant = mode.partition("-")
    # -fbgemm: int8 layers on torch's fbgemm kernel rather than blipserve's
    precision = resolve_precision(name, device, "fbgemm" if variant == "fbgemm" else "auto")
    if copy:
        model = copying.deepcopy(model)
    model.to(precision.dtype)
    if ov:  # converted from the float weights first, as blipserve loads it
        size = image_side(processor)
        mode = vision_precision(precision, adapter_cls.vision_int8)
        openvino_vision.use_openvino_vision(
            model, processor.image_processor, size, precision.dtype, mode
        )
    optimize.prepare(model, adapter_cls.speedups(precision, device))
    if variant and variant != "fbgemm":  # -eager / -sdpa / -bf16: BLIP's vision attention
        vision_encoder.set_vision_attention(model, variant)
    return adapter_cls(model, processor, device, precision)


def decodes_statically(adapter: Any, layout: str) -> bool:
    """Whether ``adapter``'s family decodes with a static cache (``--cuda-graphs``); left
    off either way (the benchmark switches it per pass)."""
    from blipserve.errors import ModelLoadError

    try:
        adapter.use_static_cache(layout)
    except ModelLoadError:
        return False
    adapter.static_cache = False
    return True


def weight_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers, and of its int8 layers' packed weights
    (which blipserve's kernel keeps outside torch: a byte a weight, a float32 scale and
    bias an output)."""
    tensors = [*model.parameters(), *model.buffers()]
    total: int = sum(t.numel() * t.element_size() for t in tensors)
    for module in model.modules():
        if getattr(module, "_kernel", None) is not None:  # an Int8Linear on the C kernel
            total += module.out_features * (module.in_features + 8)
    return total


def resident_gib() -> dict[str, float]:
    """This process's resident memory now and its peak so far (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):  # kB
                    out["rss_gib" if key == "VmRSS" else "peak_rss_gib"] = (
                        int(value.split()[0]) / 2**20
                    )
    except OSError:
        pass
    return out
