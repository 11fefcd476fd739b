"""bench/speed.py's measurements: the device's matmul ceilings, the FLOPs of one caption,
the catalog's per-image float32 loop, and blipserve's engine in each mode and batch size,
interleaved over repeated passes."""

from __future__ import annotations

import argparse
import base64
import gc
import io
import statistics
import time
from typing import TYPE_CHECKING, Any

from common import sample_images
from PIL import Image
from speed_models import (
    build,
    decodes_statically,
    log,
    make_adapter,
    model_workers,
    resident_gib,
    sync,
    weight_bytes,
)
from stages import StageClock, decode_ms

from testkit.stats import percentile

if TYPE_CHECKING:
    pass


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
        # the measured pass, its stages timed (a few microseconds a module call: the clock
        # costs well under 1% of a pass of these models)
        with StageClock(adapter) as clock:
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
        "stages": clock.report(len(rows), elapsed),
        "texts": [getattr(o, "text", "") for o in outcomes],
    }


def summarise(runs: list[dict[str, Any]], latency: str) -> dict[str, Any]:
    """Median images/s and latency over repeated runs, with the images/s of each run, and
    each stage's median (ms per image) where the runs timed stages."""
    rates = [r["images_per_s"] for r in runs]
    out = {
        "images": runs[0]["images"],
        "images_per_s": statistics.median(rates),
        "images_per_s_runs": rates,
        latency: statistics.median(r[latency] for r in runs),
    }
    if all("stages" in r for r in runs):
        out["stages"] = {
            key: None
            if any(r["stages"][key] is None for r in runs)
            else statistics.median(r["stages"][key] for r in runs)
            for key in runs[0]["stages"]
        }
    return out


def bench_model(layout: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
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

    # JPEG decoding alone (the engine's decode workers do it beside the model)
    out["image_decoding_ms"] = decode_ms(
        [base64.b64encode(d).decode() for d in jpegs[:8]], processor.image_processor.size["height"]
    )
    out["flops_per_image"] = caption_flops(model, processor, jpegs[0], args.tokens)
    log(f"{layout}: {out['flops_per_image'] / 1e9:.1f} GFLOP per caption")
    log(f"{layout}: baseline float32, {n_base} images one by one")
    bases = [baseline(model, processor, jpegs[:n_base], args.tokens)]
    log(f"{layout}: baseline {bases[0]['images_per_s']:.2f} images/s")

    # One adapter per mode, all alive at once so that repeats can interleave them (this
    # machine's speed drifts by 10-20% over minutes).  Each works on its own copy of the
    # float32 model, which the baseline keeps using; with one pass the last mode converts
    # the model itself (on a GPU, no float32 copy is then left taking memory).
    # A mode may hold ":wN": the engine with N model workers (default: its own choice),
    # on the same adapter as the mode without it (speed_models.model_workers).
    base_modes = list(dict.fromkeys(model_workers(mode)[0] for mode in args.modes))
    prepared = {
        base: make_adapter(
            layout,
            model,
            processor,
            device,
            base,
            copy=not (args.repeats == 1 and base == base_modes[-1]),
        )
        for base in base_modes
    }
    adapters = {mode: prepared[model_workers(mode)[0]] for mode in args.modes}
    gc.collect()
    out["weights_gib"] = {m: weight_bytes(a.model) / 2**30 for m, a in prepared.items()}
    # how build_model built each mode: its steps, what runs each, any left out and why
    out["build"] = {m: [step.as_dict() for step in a.build] for m, a in prepared.items()}
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
                workers = model_workers(mode)[1]
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
    if args.static_cache and decodes_statically(adapter):
        statically = adapter.with_static_cache()  # (the same model, a static cache)
        # --cuda-graphs: a static KV cache, which makes generate compile the text decoder's
        # step on CUDA (transformers' auto-compile: torch.compile mode reduce-overhead).
        eager = {r["batch"]: r["texts"] for r in out["blipserve"] if r["dtype"] == out["dtype"]}
        out["blipserve_static_cache"] = []
        for batch in args.static_batches:
            rows = jpegs[: rows_for(batch)]
            t = time.perf_counter()
            first = engine_run(statically, rows, args.tokens, batch, 8)  # compiles this size
            compile_s = time.perf_counter() - t
            # Eager and compiled back to back, --repeats times (at least 3): a pass of 16
            # images lasts a fraction of a second on a GPU, so single passes of each
            # disagree by 2x between runs; the gain is the median of each pair's ratio.
            pairs = []
            for _ in range(max(3, args.repeats)):
                e = engine_run(adapter, rows, args.tokens, batch, 8)
                pairs.append((e, engine_run(statically, rows, args.tokens, batch, 8)))
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
        del statically
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
