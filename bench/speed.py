"""Speed table: the catalog's per-image float32 loop vs blipserve's engine, side by side.

For each model (random weights built on the device from the published configs in
``tests/data/hf-layouts``: ``blip-image-captioning-base`` and, by default on a GPU,
``blip2-opt-2.7b``), in one process:

* **baseline** — what the catalog's scoring wrapper does per image: ``Image.open(...)``,
  ``processor(images=..., return_tensors="pt")``, ``model.generate``, ``batch_decode``;
  float32 (torch's defaults: no TF32), one image per call.
* **blipserve** — :class:`blipserve.engine.Engine` over the same model, in each mode
  (``--modes``; default: what ``--dtype auto`` picks on a GPU; on a CPU bfloat16 with
  and without SDPA vision attention, and int8 with eager, float32 SDPA and bf16 vision
  attention, and with one model worker instead of two, so each optimisation shows alone)
  at each batch size (``--batches``); base64 JPEG rows decoded by its thread pool, as
  every entry point does.

Every caption is exactly ``--tokens`` tokens (``min_new_tokens = max_new_tokens``), so each
side does the same model work.  With ``--repeats N`` each pass runs the baseline and then
every mode, and a mode's ratio to the baseline is the median over the passes of its ratio
to the same pass's baseline (this machine's speed drifts by 10-30% within minutes; within
a pass the two sides run minutes apart at most).  Also measured in the same run: the
device's bf16 and fp32 matmul rates (the ceilings), the FLOPs of one caption (torch's
FlopCounterMode over one ``generate``), hence each mode's achieved GFLOP/s as a share of
the bf16 ceiling, and the quality guard — the built-in ``demo`` model's captions per dtype
against float32's on held-out scenes.

    python bench/speed.py --out speed.json        # CPU ~3 min on 2 cores; H100/H200 ~2 min
    python bench/speed.py --quick                 # smoke test with tiny models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import machine_info
from speed_guards import STATIC_GUARD_MODEL, quality_guard, static_cache_guard
from speed_models import log
from speed_report import markdown
from speed_runs import bench_model, matmul_rate

from blipserve.models.precision import cpu_has_native_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--images", type=int, default=256, help="distinct test images at most")
    parser.add_argument("--min-images", type=int, help="per run (default 16 GPU, 8 CPU)")
    parser.add_argument("--baseline-images", type=int, help="default 32 GPU, 8 CPU")
    parser.add_argument("--batches", type=int, nargs="+", help="default 1 8 32 64 GPU, 1 8 CPU")
    parser.add_argument(
        "--modes",
        nargs="+",
        help="blipserve modes, in order: auto, float32, bfloat16, float16, int8, each as "
        "blipserve loads it, or with -eager / -sdpa / -bf16 to force BLIP's vision attention "
        "one way (blipserve uses SDPA for float32 on a CPU, bf16 products for int8 where the "
        "CPU has native bf16), int8-fbgemm for int8 on torch's kernel instead of blipserve's, "
        "and with :wN for N model workers (int8:w1), +ov for the vision encoder on OpenVINO "
        "(int8+ov: the decoder in int8, the encoder in OpenVINO's static int8, what auto loads "
        "for BLIP on a CPU with OpenVINO and VNNI), and then optionally speed options left "
        "out by name, 'int8+ov -\"AMX image keys and values\"' (--disable-speedup); "
        "default: auto on GPU; int8, int8+ov, and bfloat16+ov with native bf16, on CPU",
    )
    parser.add_argument("--models", nargs="+", help="default: BLIP-base, and BLIP-2 on GPU")
    parser.add_argument("--guard-scenes", type=int, help="default 300 GPU, 200 CPU; quick 40")
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="also with a static KV cache (--cuda-graphs: BLIP captioning, BLIP-2 with OPT)",
    )
    parser.add_argument("--static-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="passes over baseline and modes, interleaved; medians are reported",
    )
    parser.add_argument("--no-guard", action="store_true", help="skip the quality guard")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    layouts = ["blip-image-captioning-base", "blip2-opt-2.7b"]
    args.models = args.models or (layouts if gpu or args.quick else layouts[:1])
    args.batches = args.batches or ([1, 8, 32, 64] if gpu else [1, 8])
    cpu_modes = ["int8", "int8+ov"] + (["bfloat16+ov"] if cpu_has_native_bf16() else [])
    args.modes = args.modes or (["auto"] if gpu else cpu_modes)
    args.min_images = args.min_images or (16 if gpu else 8)
    args.baseline_images = args.baseline_images or (32 if gpu else 8)
    args.guard_scenes = args.guard_scenes or (40 if args.quick else 300 if gpu else 200)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "models": [],
    }
    if gpu:
        report["gpu"] = torch.cuda.get_device_name()
    n = 512 if args.quick else (8192 if gpu else 2048)
    # Ceilings measured here and now, with this process's torch threads. (bf16 without
    # native support is emulated: minutes at 2048, and no one's ceiling; a small product
    # still says how slow it is.)
    native = gpu or cpu_has_native_bf16()
    report["matmul_tflops"] = {
        "bfloat16": matmul_rate(torch.bfloat16, n if native else 512),
        "float32": matmul_rate(torch.float32, n // 2 if gpu else n),
    }
    log(f"{report.get('gpu', 'CPU')}: matmul TFLOP/s {report['matmul_tflops']}")

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    for layout in args.models:
        try:
            report["models"].append(bench_model(layout, args, device))
        except Exception as exc:  # keep what was measured for the other model
            log(f"{layout} failed: {exc!r}")
            report["models"].append({"layout": layout, "error": repr(exc)})
        save()
    try:
        if args.no_guard:
            raise RuntimeError("skipped (--no-guard)")
        report["quality_guard"] = quality_guard(device, args.guard_scenes)
        log(f"quality guard: {report['quality_guard']}")
    except Exception as exc:
        log(f"quality guard failed: {exc!r}")
        report["quality_guard"] = {"error": repr(exc)}
    save()
    guarded = [STATIC_GUARD_MODEL[m] for m in args.models if m in STATIC_GUARD_MODEL]
    for demo in guarded if args.static_cache and gpu else []:
        # (demo-vqa's under the key that results files before BLIP's static cache used)
        key = "static_cache_guard" + ("" if demo == "demo-vqa" else f"_{demo}")
        try:
            report[key] = static_cache_guard(device, args.guard_scenes, "bfloat16", demo)
        except Exception as exc:
            log(f"static cache guard ({demo}) failed: {exc!r}")
            report[key] = {"error": repr(exc)}
        save()
    print(markdown(report))


if __name__ == "__main__":
    main()
