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
import base64
import gc
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from blipserve.models.base import HFAdapter

from common import (
    LAYOUTS,
    QUICK_BLIP,
    QUICK_BLIP2,
    SEED,
    _merge,
    machine_info,
    percentile,
    sample_images,
)

QUICK = {"blip-image-captioning-base": QUICK_BLIP, "blip2-opt-2.7b": QUICK_BLIP2}


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(dtype: Any, n: int, reps: int = 10) -> float:
    """TFLOP/s of an n x n x n product on random data (mean of ``reps`` after warm-up)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


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


def caption_flops(model: Any, processor: Any, jpeg: bytes, tokens: int) -> int:
    """FLOPs of one caption (``tokens`` new tokens), counted op by op with torch's formulas.

    (A plain dispatch mode over ``flop_registry``: FlopCounterMode's module tracker fails
    inside BLIP-2's ``generate``.)
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch: untyped
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            formula = flop_registry.get(func._overloadpacket)
            if formula is None:
                # Composite ops (linear, ...) reach a mode whole: count their parts.
                parts = func.decompose(*args, **kwargs)
                if parts is not NotImplemented:
                    return parts
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    device = next(model.parameters()).device
    inputs = processor(images=Image.open(io.BytesIO(jpeg)).convert("RGB"), return_tensors="pt")
    counter = Count()  # type: ignore[no-untyped-call]
    # no_grad, not inference_mode: under inference_mode composite ops such as linear reach
    # the mode undecomposed, and their matmuls would go uncounted.
    with torch.no_grad(), counter:
        model.generate(**inputs.to(device), max_new_tokens=tokens, min_new_tokens=tokens)
    return counter.total


def baseline(model: Any, processor: Any, jpegs: list[bytes], tokens: int) -> dict[str, Any]:
    """The catalog's loop: one image per call, float32."""
    import torch

    device = next(model.parameters()).device
    gen = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    times = []
    with torch.inference_mode():
        warm = processor(images=Image.new("RGB", (64, 64)), return_tensors="pt").to(device)
        model.generate(**warm, max_new_tokens=2)
        for data in jpegs:
            start = time.perf_counter()
            image = Image.open(io.BytesIO(data)).convert("RGB")
            inputs = processor(images=image, return_tensors="pt").to(device)
            out = model.generate(**inputs, **gen)
            processor.batch_decode(out, skip_special_tokens=True)
            times.append(time.perf_counter() - start)
    return {
        "images": len(jpegs),
        "images_per_s": len(times) / sum(times),
        "latency_p50_s": percentile(times, 50),
    }


def engine_run(
    adapter: Any,
    jpegs: list[bytes],
    tokens: int,
    batch: int,
    workers: int,
    model_workers: int = 0,
) -> dict[str, Any]:
    """blipserve's engine over base64 JPEG rows at ``batch`` rows per model call."""
    from blipserve.config import EngineConfig
    from blipserve.engine import Engine
    from blipserve.params import GenerationParams
    from blipserve.types import RowInput

    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    rows = [RowInput(i, base64.b64encode(d).decode()) for i, d in enumerate(jpegs)]
    config = EngineConfig(max_batch_size=batch, decode_workers=workers, model_workers=model_workers)
    with Engine(adapter, config=config) as e:
        e.predict(rows[:batch], params)  # warm-up at this batch size
        sync()
        start = time.perf_counter()
        outcomes = e.predict(rows, params)
        sync()
        elapsed = time.perf_counter() - start
        # single-image latency: one row through the whole engine
        single = []
        for row in rows[:5]:
            t = time.perf_counter()
            e.predict([row], params)
            single.append(time.perf_counter() - t)
    bad = [o for o in outcomes if not hasattr(o, "text")]
    if bad:
        raise RuntimeError(f"{len(bad)} rows failed: {bad[0]}")
    return {
        "batch": batch,
        "images": len(rows),
        "images_per_s": len(rows) / elapsed,
        "single_latency_p50_s": percentile(single, 50),
        "texts": [getattr(o, "text", "") for o in outcomes],
    }


def bench_model(
    layout: str, adapter_cls: type[HFAdapter], args: argparse.Namespace, device: Any
) -> dict[str, Any]:
    import torch

    log(f"{layout}: building random weights on {device}")
    t = time.perf_counter()
    model, processor = build(layout, args.quick, device)
    params = sum(p.numel() for p in model.parameters())
    log(f"{layout}: {params / 1e6:.0f} M parameters in {time.perf_counter() - t:.1f} s")
    n_base = args.baseline_images if not layout.startswith("blip2") else args.baseline_images // 2

    def rows_for(batch: int) -> int:  # images per engine run: two batches at least
        return max(int(args.min_images), 2 * batch)

    static = args.static_batches if args.static_cache else []
    needed = max(n_base, *(rows_for(b) for b in [*args.batches, *static]))
    jpegs = [base64.b64decode(s) for s in sample_images(min(args.images, needed))]
    out: dict[str, Any] = {"layout": layout, "parameters": params}
    out["float32_weights_gib"] = weight_bytes(model) / 2**30

    out["flops_per_image"] = caption_flops(model, processor, jpegs[0], args.tokens)
    log(f"{layout}: {out['flops_per_image'] / 1e9:.1f} GFLOP per caption")
    log(f"{layout}: baseline float32, {n_base} images one by one")
    bases = [baseline(model, processor, jpegs[:n_base], args.tokens)]
    log(f"{layout}: baseline {bases[0]['images_per_s']:.2f} images/s")

    # One adapter per mode, all alive at once so that repeats can interleave them (this
    # machine's speed drifts by 10-20% over minutes).  Each works on its own copy of the
    # float32 model, which the baseline keeps using; with one pass the last mode converts
    # the model itself (on a GPU, no float32 copy is then left taking memory).
    # A mode may end in ":wN": the engine with N model workers (default: its own choice),
    # on the same adapter as the mode without it.
    base_modes = list(dict.fromkeys(mode.partition(":w")[0] for mode in args.modes))
    prepared = {
        base: make_adapter(
            adapter_cls,
            model,
            processor,
            device,
            base,
            copy=not (args.repeats == 1 and base == base_modes[-1]),
        )
        for base in base_modes
    }
    adapters = {mode: prepared[mode.partition(":w")[0]] for mode in args.modes}
    gc.collect()
    out["weights_gib"] = {m: weight_bytes(a.model) / 2**30 for m, a in prepared.items()}
    # (on a CPU: the float32 model the baseline uses is still resident unless the last mode
    # converted it in place, i.e. --repeats 1)
    out["memory_after_prepare"] = resident_gib()
    log(f"{layout}: weights {out['weights_gib']} GiB; process {out['memory_after_prepare']}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {
        (mode, batch): [] for mode in args.modes for batch in args.batches
    }
    for rep in range(args.repeats):
        if rep:
            bases.append(baseline(model, processor, jpegs[:n_base], args.tokens))
            log(f"{layout}: pass {rep + 1}: baseline {bases[-1]['images_per_s']:.2f} images/s")
        for mode, adapter in adapters.items():
            for batch in args.batches:
                workers = int(mode.partition(":w")[2] or 0)
                r = engine_run(adapter, jpegs[: rows_for(batch)], args.tokens, batch, 8, workers)
                runs[(mode, batch)].append(r)
                log(
                    f"{layout}: pass {rep + 1}: blipserve {mode} batch {batch}: "
                    f"{r['images_per_s']:.2f} images/s"
                )
    out["baseline"] = summarise(bases, "latency_p50_s")
    out["blipserve"] = []
    for (mode, batch), rs in runs.items():
        r = summarise(rs, "single_latency_p50_s")
        r.update(dtype=mode, batch=batch, texts=rs[0]["texts"])
        # Each pass against the baseline of the same pass, measured minutes apart at most:
        # the machine's drift (10-30% over minutes here) then mostly cancels in the ratio.
        r["ratio_runs"] = [
            x["images_per_s"] / b["images_per_s"] for x, b in zip(rs, bases, strict=True)
        ]
        r["ratio"] = statistics.median(r["ratio_runs"])
        r["latency_ratio_runs"] = [
            b["latency_p50_s"] / x["single_latency_p50_s"] for x, b in zip(rs, bases, strict=True)
        ]
        r["latency_ratio"] = statistics.median(r["latency_ratio_runs"])
        out["blipserve"].append(r)
    adapter = adapters[args.modes[-1]]
    model = adapter.model
    out["dtype"] = out["blipserve"][-1]["dtype"]
    if args.static_cache and decodes_statically(adapter, layout):
        # --cuda-graphs: a static KV cache, which makes generate compile the text decoder's
        # step on CUDA (transformers' auto-compile: torch.compile mode reduce-overhead).
        eager = {r["batch"]: r["texts"] for r in out["blipserve"] if r["dtype"] == out["dtype"]}
        out["blipserve_static_cache"] = []
        for batch in args.static_batches:
            rows = jpegs[: rows_for(batch)]
            t = time.perf_counter()
            adapter.static_cache = True
            first = engine_run(adapter, rows, args.tokens, batch, 8)  # compiles this size
            compile_s = time.perf_counter() - t
            # Eager and compiled back to back, --repeats times (at least 3): a pass of 16
            # images lasts a fraction of a second on a GPU, so single passes of each
            # disagree by 2x between runs; the gain is the median of each pair's ratio.
            pairs = []
            for _ in range(max(3, args.repeats)):
                adapter.static_cache = False
                e = engine_run(adapter, rows, args.tokens, batch, 8)
                adapter.static_cache = True
                pairs.append((e, engine_run(adapter, rows, args.tokens, batch, 8)))
            r = summarise([s for _, s in pairs], "single_latency_p50_s")
            r.update(batch=batch, texts=first["texts"], wall_with_compile_s=compile_s)
            r["eager_images_per_s_runs"] = [e["images_per_s"] for e, _ in pairs]
            r["eager_images_per_s"] = statistics.median(r["eager_images_per_s_runs"])
            r["gain_runs"] = [s["images_per_s"] / e["images_per_s"] for e, s in pairs]
            r["gain"] = statistics.median(r["gain_runs"])
            r["eager_latency_p50_s"] = statistics.median(
                e["single_latency_p50_s"] for e, _ in pairs
            )
            r["ratio"] = r["images_per_s"] / out["baseline"]["images_per_s"]
            if batch in eager:
                same = sum(a == b for a, b in zip(r["texts"], eager[batch], strict=False))
                r["same_as_eager"] = same / len(r["texts"])
            out["blipserve_static_cache"].append(r)
            log(
                f"{layout}: static cache batch {batch}: {r['images_per_s']:.2f} images/s, "
                f"{r['gain']:.2f}x eager's {r['eager_images_per_s']:.2f} (median of "
                f"{len(pairs)} pairs; {compile_s:.0f} s with compilation)"
            )
        adapter.static_cache = False
    for results in (out["blipserve"], out.get("blipserve_static_cache", [])):
        for result in results:
            result.pop("texts", None)
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["memory_at_end"] = resident_gib()
    del adapter, adapters, prepared, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


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


def summarise(runs: list[dict[str, Any]], latency: str) -> dict[str, Any]:
    """Median images/s and latency over repeated runs, with the images/s of each run."""
    rates = [r["images_per_s"] for r in runs]
    return {
        "images": runs[0]["images"],
        "images_per_s": statistics.median(rates),
        "images_per_s_runs": rates,
        latency: statistics.median(r[latency] for r in runs),
    }


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


def png_b64(image: Image.Image) -> str:
    """``image`` as a base64 PNG row (the demo scenes are drawn, so lossless)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def quality_guard(device: Any, n: int) -> dict[str, Any]:
    """The ``demo`` model's captions per dtype on ``n`` held-out scenes, against float32 with
    the processor's image resize (transformers' own path, as the model card measures)."""
    from blipserve.config import ModelConfig
    from blipserve.config.serving import Backend, ImageResize
    from blipserve.engine import Engine
    from blipserve.finetune import scenes
    from blipserve.types import RowInput

    held = list(scenes.generate(scenes.HELDOUT_SEED + 1, n))
    rows = [RowInput(i, png_b64(scene.image)) for i, scene in enumerate(held)]
    said: dict[str, list[str]] = {}
    dtypes = (
        ("float32", "bfloat16", "float16")
        if device.type == "cuda"
        else ("float32", "bfloat16", "int8", "int8+ov", "bfloat16+ov")
    )
    for mode in dtypes:
        dtype, ov, _ = mode.partition("+ov")
        backend: Backend = "openvino" if ov else "torch"
        # The reference is transformers' own arithmetic, its image processor included (on a
        # GPU the other modes resize on the device: --image-resize auto).
        resize: ImageResize = "processor" if mode == "float32" else "auto"
        config = ModelConfig(
            model="demo",
            device=device.type,
            dtype=dtype,  # type: ignore[arg-type]
            backend=backend,
            image_resize=resize,
        )
        try:
            engine = Engine.load(config)
        except Exception as exc:  # e.g. no OpenVINO here
            log(f"quality guard: {mode} not measured: {exc}")
            continue
        with engine:
            said[mode] = [getattr(o, "text", "") for o in engine.predict(rows)]
    truth = [s.caption for s in held]
    out: dict[str, Any] = {"scenes": n}
    for dtype, texts in said.items():
        out[dtype] = {
            "exact": sum(a == b for a, b in zip(texts, truth, strict=True)) / n,
            "same_as_float32": sum(a == b for a, b in zip(texts, said["float32"], strict=True)) / n,
        }
    return out


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


#: the trained demo model that checks a layout's family with --cuda-graphs
STATIC_GUARD_MODEL = {"blip-image-captioning-base": "demo", "blip2-opt-2.7b": "demo-vqa"}


def static_cache_guard(device: Any, n: int, dtype: str, model: str) -> dict[str, Any]:
    """``model`` (``demo``: a trained BLIP captioner; ``demo-vqa``: a trained BLIP-2 with an
    OPT decoder) with ``--cuda-graphs`` and without: its captions (and ``demo-vqa``'s
    answers to every question of each scene) on ``n`` held-out scenes, the share that are
    the same, each side's exact match, and the wall time of each side's pass (the compiled
    side's includes its compilations: batches of several sizes).
    """
    from blipserve.config import EngineConfig, ModelConfig
    from blipserve.engine import Engine
    from blipserve.finetune import scenes
    from blipserve.types import RowInput

    held = list(scenes.generate(scenes.HELDOUT_SEED + 1, n))
    rows: list[RowInput] = []
    truth: list[str] = []
    for scene in held:
        image = png_b64(scene.image)
        rows.append(RowInput(len(rows), image))
        truth.append(scene.caption)
        for qa in scene.qa if model == "demo-vqa" else ():
            rows.append(RowInput(len(rows), image, qa.prompt))
            truth.append(qa.answer)
    out: dict[str, Any] = {"model": model, "scenes": n, "rows": len(rows), "dtype": dtype}
    said: dict[bool, list[str]] = {}
    for graphs in (False, True):
        cfg = ModelConfig(model=model, device=device.type, dtype=dtype, cuda_graphs=graphs)  # type: ignore[arg-type]
        t = time.perf_counter()
        with Engine.load(cfg, config=EngineConfig(max_batch_size=32)) as engine:
            said[graphs] = [getattr(o, "text", "") for o in engine.predict(rows)]
            first = time.perf_counter() - t
            t = time.perf_counter()
            engine.predict(rows)
            second = time.perf_counter() - t
        key = "cuda_graphs" if graphs else "eager"
        out[key] = {
            "exact": sum(a == b for a, b in zip(said[graphs], truth, strict=True)) / len(rows),
            "first_pass_s": first,
            "second_pass_s": second,
        }
        log(f"{model} {key}: {out[key]}")
    out["same"] = sum(a == b for a, b in zip(said[True], said[False], strict=True)) / len(rows)
    log(f"{model} with --cuda-graphs says what it says without for {out['same']:.1%} of rows")
    return out


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
        "(int8+ov: the decoder in int8, the encoder in OpenVINO's bf16, what auto loads on a "
        "CPU with OpenVINO); default: auto on GPU; int8, int8+ov, bfloat16+ov on CPU",
    )
    parser.add_argument("--models", nargs="+", help="default: BLIP-base, and BLIP-2 on GPU")
    parser.add_argument("--guard-scenes", type=int, help="default 300 GPU, 200 CPU")
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

    from blipserve.models.blip import BlipCaptionAdapter
    from blipserve.models.blip2 import Blip2Adapter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    layouts = ["blip-image-captioning-base", "blip2-opt-2.7b"]
    args.models = args.models or (layouts if gpu or args.quick else layouts[:1])
    args.batches = args.batches or ([1, 8, 32, 64] if gpu else [1, 8])
    args.modes = args.modes or (["auto"] if gpu else ["int8", "int8+ov", "bfloat16+ov"])
    args.min_images = args.min_images or (16 if gpu else 8)
    args.baseline_images = args.baseline_images or (32 if gpu else 8)
    args.guard_scenes = args.guard_scenes or (300 if gpu else 200)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "models": [],
    }
    if gpu:
        report["gpu"] = torch.cuda.get_device_name()
    n = 512 if args.quick else (8192 if gpu else 2048)
    # Ceilings measured here and now, with this process's torch threads.
    report["matmul_tflops"] = {
        "bfloat16": matmul_rate(torch.bfloat16, n),
        "float32": matmul_rate(torch.float32, n // 2 if gpu else n),
    }
    log(f"{report.get('gpu', 'CPU')}: matmul TFLOP/s {report['matmul_tflops']}")

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    adapters = {"blip-image-captioning-base": BlipCaptionAdapter, "blip2-opt-2.7b": Blip2Adapter}
    for layout in args.models:
        try:
            report["models"].append(bench_model(layout, adapters[layout], args, device))
        except Exception as exc:  # keep what was measured for the other model
            log(f"{layout} failed: {exc!r}")
            report["models"].append({"layout": layout, "error": repr(exc)})
        save()
    try:
        if args.no_guard:
            raise RuntimeError("skipped (--no-guard)")
        report["quality_guard"] = quality_guard(device, 40 if args.quick else args.guard_scenes)
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
            scenes_n = 40 if args.quick else args.guard_scenes
            report[key] = static_cache_guard(device, scenes_n, "bfloat16", demo)
        except Exception as exc:
            log(f"static cache guard ({demo}) failed: {exc!r}")
            report[key] = {"error": repr(exc)}
        save()
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = (
        report.get("gpu") or f"{m['cpu']}, {m['usable_cores']} cores, {m['torch_threads']} threads"
    )
    peak = report["matmul_tflops"]
    lines = [
        f"{where}; torch {m['torch']}, transformers {m['transformers']}; {report['tokens']} "
        "tokens per caption; random weights with the published configs.",
        f"Measured matmul ceilings: bf16 {peak['bfloat16'] * 1000:.0f} GFLOP/s, fp32 "
        f"{peak['float32'] * 1000:.0f} GFLOP/s. Images/s: median of {report.get('repeats', 1)} "
        "interleaved passes (range); x baseline: median of each pass's ratio to the baseline "
        "of the same pass (range); one image: p50 latency of one row, and how many times "
        "lower than the baseline's (median of the passes' ratios).",
        "",
        "| model | mode | batch | images/s | x baseline | one image | GFLOP/s | of bf16 peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(
        model: dict[str, Any],
        mode: str,
        batch: int,
        rate: float,
        ratio: float,
        lat: float,
        runs: list[float] | None = None,
        ratios: list[float] | None = None,
        lat_ratio: float | None = None,
    ) -> str:
        achieved = rate * model["flops_per_image"] / 1e9
        share = achieved / (peak["bfloat16"] * 1000)

        def spread(values: list[float] | None) -> str:
            return f" ({min(values):.2f}-{max(values):.2f})" if values and len(values) > 1 else ""

        lower = f" ({lat_ratio:.2f}x lower)" if lat_ratio else ""
        return (
            f"| {model['layout']} | {mode} | {batch} | {rate:.2f}{spread(runs)} | "
            f"{ratio:.2f}{spread(ratios)} | {lat * 1000:.0f} ms{lower} | {achieved:.0f} | "
            f"{share:.1%} |"
        )

    for model in report["models"]:
        if "error" in model:
            lines.append(f"| {model['layout']} | failed: {model['error'][:80]} | | | | | | |")
            continue
        b = model["baseline"]
        lines.append(
            row(
                model,
                "baseline (float32, one per call)",
                1,
                b["images_per_s"],
                1.0,
                b["latency_p50_s"],
                b.get("images_per_s_runs"),
            )
        )
        for r in model["blipserve"]:
            lines.append(
                row(
                    model,
                    f"blipserve {r['dtype']}",
                    r["batch"],
                    r["images_per_s"],
                    r["ratio"],
                    r["single_latency_p50_s"],
                    r.get("images_per_s_runs"),
                    r.get("ratio_runs"),
                    r.get("latency_ratio"),
                )
            )
        for r in model.get("blipserve_static_cache", []):
            same = f", same text as eager {r['same_as_eager']:.0%}" if "same_as_eager" in r else ""
            gain = ""
            if "gain" in r:
                lo, hi = min(r["gain_runs"]), max(r["gain_runs"])
                gain = (
                    f", {r['gain']:.2f}x ({lo:.2f}-{hi:.2f}) eager's "
                    f"{r['eager_images_per_s']:.1f} images/s and "
                    f"{r['eager_latency_p50_s'] * 1000:.0f} ms in the same passes"
                )
            mode = f"blipserve {model['dtype']} + static cache{same}{gain}"
            lines.append(
                row(
                    model,
                    mode,
                    r["batch"],
                    r["images_per_s"],
                    r["ratio"],
                    r["single_latency_p50_s"],
                    r.get("images_per_s_runs"),
                )
            )
        memory = ""
        if "weights_gib" in model:
            modes = ", ".join(f"{k} {v:.2f}" for k, v in model["weights_gib"].items())
            # (not ``peak``: row() reads the matmul ceilings under that name)
            rss = model.get("memory_at_end", {}).get("peak_rss_gib")
            memory = f"; weights GiB: float32 {model['float32_weights_gib']:.2f}, {modes}" + (
                f"; process peak {rss:.1f} GiB" if rss else ""
            )
        lines.append(
            f"({model['layout']}: {model['flops_per_image'] / 1e9:.1f} GFLOP per caption{memory})"
        )
    guard = report.get("quality_guard", {})
    if "scenes" in guard:
        parts = [
            f"{k}: exact {v['exact']:.1%}, same as fp32 {v['same_as_float32']:.1%}"
            for k, v in guard.items()
            if isinstance(v, dict)
        ]
        lines += ["", f"demo quality guard on {guard['scenes']} scenes — " + "; ".join(parts)]
    for key in sorted(k for k in report if k.startswith("static_cache_guard")):
        sc = report[key]
        if "same" not in sc:
            continue
        what = "captions and answers" if sc.get("model", "demo-vqa") == "demo-vqa" else "captions"
        lines += [
            "",
            f"{sc.get('model', 'demo-vqa')} ({sc['dtype']}, {sc['rows']} {what} of {sc['scenes']} "
            f"scenes) with --cuda-graphs says what it says without for {sc['same']:.1%} of "
            f"rows; exact {sc['cuda_graphs']['exact']:.1%} vs {sc['eager']['exact']:.1%}; "
            f"passes {sc['cuda_graphs']['first_pass_s']:.0f} s then "
            f"{sc['cuda_graphs']['second_pass_s']:.1f} s vs {sc['eager']['first_pass_s']:.0f} s "
            f"then {sc['eager']['second_pass_s']:.1f} s",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
