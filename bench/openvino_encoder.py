"""The vision encoder alone: blipserve's torch int8 against OpenVINO's precisions, side by side.

Full-size random-weight BLIP-base ViT (384 px; ``--layout`` for another, BLIP-2's ViT-g with
2 of its layers), built from the published config (tests/data/hf-layouts).  Eight ordinary
photographs (scikit-image, scikit-learn) through the model's processor; per mode, ms per
image at batch 1 and batch 8, passes interleaved (this machine drifts by 10-30% within
minutes), medians over the passes; and each mode's worst photo's feature cosine (last
hidden state) against transformers' float32.

Modes (``--modes``): ``torch-int8`` (blipserve's int8 linears, as ``--dtype int8`` loads
them on torch without AMX), ``torch-bf16`` (the encoder's weights in bfloat16 on torch, one
image per call, as ``--dtype int8`` loads them where the CPU has AMX), ``torch-f32`` (float32
with SDPA attention, as ``--dtype float32`` loads it), and on OpenVINO as
``--backend openvino`` loads them: ``ov-f32``, ``ov-bf16``, ``ov-int8-static`` (NNCF int8
of weights and activations with blipserve's recipe and generated calibration:
``openvino_int8.quantize``), ``ov-int8-dynamic`` (int8 weights, activations quantized per
token at run time); for comparison, ``ov-nncf-preset`` (NNCF's transformer preset as it
comes, SmoothQuant on, calibrated on twelve photographs outside the evaluation set).  The
cache is a fresh temporary folder, so ``ready in`` includes conversion and quantization.

    .venv/bin/python bench/openvino_encoder.py --out bench/results/openvino-encoder-2.json
    .venv/bin/python bench/openvino_encoder.py --quick --modes torch-int8 ov-bf16 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # testkit/, shared with the tests
sys.path.insert(0, str(ROOT / "bench"))

MODES = (
    "torch-int8",
    "torch-bf16",
    "torch-f32",
    "ov-f32",
    "ov-bf16",
    "ov-int8-static",
    "ov-int8-dynamic",
    "ov-nncf-preset",
)
CALIBRATION = ("camera", "immunohistochemistry", "hubble_deep_field", "retina", "coins", "moon")
#: --quick: the encoder at its real input size, shrunk to a tiny network
QUICK_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def calibration_pixels(processor: Any) -> list[np.ndarray]:
    """One-image batches of scikit-image photos that the evaluation set does not hold."""
    from PIL import Image

    from testkit.photos import photo

    out = []
    for name in CALIBRATION:
        image = photo(name)
        for picture in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            out.append(processor(images=picture, return_tensors="np")["pixel_values"])
    return out


def openvino_mode(mode: str, vision: Any, side: int, processor: Any) -> Any:
    """A callable pixels (B, 3, S, S) -> last hidden state for an OpenVINO ``mode``."""
    import nncf
    import openvino as ov

    from blipserve.models import openvino_vision

    if mode.removeprefix("ov-") in openvino_vision.MODES:  # as blipserve loads them
        encoder = openvino_vision.compile_vision(
            vision, side, torch.float32, mode.removeprefix("ov-"), processor
        )
        return lambda pixels: encoder(pixel_values=pixels).last_hidden_state
    key = openvino_vision.fingerprint(vision, side, ov.get_version())
    model, _ = openvino_vision._converted(vision, side, key)
    model = model.clone()
    settings = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    if mode == "ov-nncf-preset":  # NNCF's transformer preset as it comes, photo calibration
        model = nncf.quantize(
            model,
            nncf.Dataset(calibration_pixels(processor)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(CALIBRATION) * 2,
        )
    compiled = ov.Core().compile_model(model, "CPU", settings)
    request = compiled.create_infer_request()

    def run(pixels: torch.Tensor) -> torch.Tensor:
        request.infer({0: pixels.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def torch_int8(vision: Any) -> Any:
    """blipserve's int8 encoder as ``--dtype int8`` builds it where the CPU lacks AMX."""
    from blipserve.models import optimize

    holder, int8 = _engine_attention(vision)
    optimize.prepare(holder, optimize.int8_vision(int8))
    return _last_hidden_state(holder.vision_model)


def torch_bf16(vision: Any) -> Any:
    """The encoder as ``--dtype int8`` builds it where the CPU has AMX (bf16 weights)."""
    from blipserve.models.vision_encoder import vision_in_bf16

    holder, int8 = _engine_attention(vision)
    vision_in_bf16(holder, int8.dtype)
    return _last_hidden_state(holder.vision_model)


def torch_f32(vision: Any) -> Any:
    """The encoder as ``--dtype float32`` builds it on a CPU (SDPA attention, BLIP's)."""
    from transformers import BlipVisionModel

    from blipserve.models import optimize

    holder = torch.nn.Module()
    holder.vision_model = copy.deepcopy(vision)
    if isinstance(vision, BlipVisionModel):  # (BLIP-2's ViT-g keeps transformers' own)
        optimize.vision_attention("sdpa").apply(holder)
    return _last_hidden_state(holder.vision_model)


def _engine_attention(vision: Any) -> tuple[torch.nn.Module, Any]:
    """A copy of ``vision`` in a holder (as ``model.vision_model``), its attention as the
    int8 mode's (BLIP's: bf16 products where the CPU has bf16), and that precision."""
    from blipserve.models import optimize
    from blipserve.models.blip import _vision_attention
    from blipserve.models.precision import resolve_precision

    cpu = torch.device("cpu")
    int8 = resolve_precision("int8", cpu)
    holder = torch.nn.Module()
    holder.vision_model = copy.deepcopy(vision)
    how = _vision_attention(int8, cpu)
    if how != "eager":  # (BLIP's attention only: nothing in BLIP-2's ViT-g)
        optimize.vision_attention(how).apply(holder)
    return holder, int8


def _last_hidden_state(model: Any) -> Any:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # (each build runs one image per call itself)
            out: torch.Tensor = model(pixel_values=pixels).last_hidden_state
        return out

    return run


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> None:
    from common import machine_info

    from testkit.models import random_vision_encoder
    from testkit.photos import photos

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", default="blip-image-captioning-base")
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny encoder of the same layout")
    args = parser.parse_args()
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bench-openvino-")

    vision, processor = random_vision_encoder(args.layout, QUICK_VISION if args.quick else None)
    side = processor.image_processor.size["height"]
    pictures = [p.convert("RGB") for p in photos().values()][:8]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]  # (6, 3, S, S)
    pixels = torch.cat([pixels, pixels.flip(-1)])[:8]  # (8, 3, S, S)
    with torch.inference_mode():
        reference = [vision(pixel_values=p[None]).last_hidden_state for p in pixels]
    on_torch = {"torch-int8": torch_int8, "torch-bf16": torch_bf16, "torch-f32": torch_f32}
    runners = {
        mode: on_torch[mode](vision)
        if mode in on_torch
        else openvino_mode(mode, vision, side, processor)
        for mode in args.modes
    }
    results: dict[str, Any] = {}
    for mode, run in runners.items():
        outs = [run(p[None]) for p in pixels]
        batched = run(pixels)
        results[mode] = {
            "cosine_worst": min(cosine(o, r) for o, r in zip(outs, reference, strict=True)),
            "batch_equals_one_by_one": bool(torch.equal(batched, torch.cat(outs))),
            "ms_per_image": {"1": [], "8": []},
        }
    for rep in range(args.repeats):
        for mode, run in runners.items():
            started = time.perf_counter()
            for p in pixels[:4]:
                run(p[None])
            results[mode]["ms_per_image"]["1"].append((time.perf_counter() - started) / 4 * 1e3)
            started = time.perf_counter()
            run(pixels)
            results[mode]["ms_per_image"]["8"].append((time.perf_counter() - started) / 8 * 1e3)
        print(f"pass {rep + 1} done", file=sys.stderr)
    for mode, r in results.items():
        r["median_ms"] = {b: statistics.median(v) for b, v in r["ms_per_image"].items()}
        print(
            f"{mode:16} batch 1 {r['median_ms']['1']:6.0f} ms"
            f"  batch 8 {r['median_ms']['8']:6.0f} ms  cosine {r['cosine_worst']:.5f}"
            f"  batch == one by one: {r['batch_equals_one_by_one']}"
        )
    report = {
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "layout": args.layout,
        "photos": len(pixels),
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
