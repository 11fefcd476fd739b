"""bench/speed.py's models: random weights in float32 built from a published layout, and
blipserve's adapter over them in each mode (a dtype, int8, BLIP's vision attention one way,
the encoder on OpenVINO), as blipserve loads them; their memory."""

from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING, Any

from common import QUICK_BLIP, QUICK_BLIP2, SEED, _merge

from testkit.models import LAYOUTS

if TYPE_CHECKING:
    from blipserve.config import ModelConfig
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


def model_workers(mode: str) -> tuple[str, int]:
    """``int8:w1`` or ``int8+ov:w1 -"NAME"`` -> the mode without its ``:wN`` and N (0: the
    engine's own choice of model workers)."""
    match = re.search(r":w(\d+)", mode)
    if match is None:
        return mode, 0
    return mode[: match.start()] + mode[match.end() :], int(match[1])


def left_out(mode: str) -> tuple[str, tuple[str, ...]]:
    """``MODE -"NAME" -"OTHER"`` -> ``(MODE, ("NAME", "OTHER"))``: the speed options a
    mode leaves out by name (``--disable-speedup``)."""
    mode, _, rest = mode.partition(" -")
    return mode, tuple(name.strip('"') for name in rest.split(" -")) if rest else ()


def mode_spec(layout: str, mode: str, device: Any) -> ModelConfig:
    """The model spec of a benchmark ``mode``: ``auto``, a dtype or ``int8`` (as blipserve
    picks and loads it, the vision encoder on torch), then optionally ``-eager`` /
    ``-sdpa`` / ``-bf16`` (``--vision-attention``: BLIP's one way) or ``-fbgemm``
    (``--int8-kernel fbgemm``), then optionally ``+ov`` (``--backend openvino``), then
    optionally speed options left out by name (:func:`left_out`)."""
    from blipserve.config import ModelConfig

    mode, off = left_out(mode)
    mode, ov, _ = mode.partition("+ov")
    name, _, variant = mode.partition("-")
    return ModelConfig(
        model=layout,
        device=device.type,
        dtype=name,  # type: ignore[arg-type]
        int8_kernel="fbgemm" if variant == "fbgemm" else "auto",
        backend="openvino" if ov else "torch",
        vision_attention=variant if variant and variant != "fbgemm" else "auto",  # type: ignore[arg-type]
        disable_speedup=off,
    )


def make_adapter(
    layout: str, model: Any, processor: Any, device: Any, mode: str, copy: bool
) -> HFAdapter:
    """``model`` (float32) built as ``mode`` (:func:`mode_spec`) by blipserve's
    ``build_model``, exactly as a server loads it; on a ``copy`` of it, or converting
    ``model`` itself."""
    import copy as copying

    from blipserve.models import build_model

    spec = mode_spec(layout, mode, device)
    return build_model(spec, pretrained=(copying.deepcopy(model) if copy else model, processor))


def decodes_statically(adapter: HFAdapter) -> bool:
    """Whether ``adapter``'s family decodes with a static cache (``--cuda-graphs``)."""
    return adapter.static_cache_refusal(adapter.model.config) is None


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


def memory_gib(*fields: str) -> dict[str, float]:
    """``fields`` of this process's /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``,
    ``RssFile``, ...), in GiB (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:  # kB
                    out[key] = int(value.split()[0]) / 2**20
    except OSError:
        pass
    return out


def resident_gib() -> dict[str, float]:
    """This process's resident memory now and its peak so far (Linux; empty elsewhere)."""
    names = {"VmRSS": "rss_gib", "VmHWM": "peak_rss_gib"}
    return {names[key]: value for key, value in memory_gib(*names).items()}
