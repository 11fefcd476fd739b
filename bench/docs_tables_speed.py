"""The docs' tables of model speed: bench/speed.py's on a CPU (BLIP-base, BLIP-2) and on
a GPU (with and without CUDA graphs), and bench/openvino_encoder.py's vision encoders."""

from __future__ import annotations

from pathlib import Path

from docs_tables_base import cpu_machine, load, renderer, span, speed_model, table

CPU_MODES = {
    "int8": "int8, torch's encoder (blipserve's int8 kernel)",
    "int8+ov": "**int8, OpenVINO static int8 encoder (default)**",
}


@renderer("cpu-blip-base")
def cpu_blip_base(results: Path) -> str:
    name = "speed-cpu-openvino-int8.json"
    report = load(results, name)
    model = speed_model(report, "blip-image-captioning-base")
    base = model["baseline"]
    intro = (
        f"`python bench/speed.py --modes int8 int8+ov --batches 1 8 --repeats "
        f"{report['repeats']}` ({cpu_machine(report)}; `bench/results/{name}`): full-size "
        f"BLIP-base, random weights, {report['tokens']} tokens a caption. The catalog's loop "
        f"(float32, one image per call) ran at {base['images_per_s']:.2f} images/s, "
        f"{base['latency_p50_s'] * 1000:.0f} ms an image; ratios are the median of each "
        "pass's ratio to the loop in the same pass."
    )
    rows = [
        f"| {CPU_MODES.get(r['dtype'], r['dtype'])} | {r['batch']} | "
        f"{r['images_per_s']:.2f}{span(r.get('images_per_s_runs'))} | "
        f"{r['ratio']:.2f}x{span(r.get('ratio_runs'))} | "
        f"{r['single_latency_p50_s'] * 1000:.0f} ms | {r['latency_ratio']:.2f}x |"
        for r in model["blipserve"]
    ]
    guard = report.get("quality_guard", {})
    after = ""
    if "int8+ov" in guard:
        after = (
            f"Quality guard in the same run (`demo`, {guard['scenes']} held-out scenes): "
            f"captions equal float32's for {guard['int8+ov']['same_as_float32']:.1%} (OpenVINO "
            f"int8) and {guard['int8']['same_as_float32']:.1%} (torch int8)."
        )
    columns = ["blipserve", "batch", "images/s", "x the loop", "one image", "x lower"]
    return table(intro, columns, rows, after) + stage_table(model)


STAGES = {
    "pixels_ms": "pixels",
    "vision_ms": "vision",
    "first_step_ms": "first step",
    "steps_ms": "later steps",
    "generate_overhead_ms": "`generate` itself",
    "predict_other_ms": "rest of `predict`",
    "engine_ms": "engine",
    "wall_ms": "total",
}


def stage_table(model: dict[str, object]) -> str:
    """Where the time went, ms per image by stage (bench/stages.py), where measured."""
    runs = [r for r in model["blipserve"] if "stages" in r]  # type: ignore[attr-defined]
    if not runs:
        return ""
    rows = [
        f"| {r['dtype']} | {r['batch']} | "
        + " | ".join(
            "-" if r["stages"][key] is None else f"{r['stages'][key]:.0f}" for key in STAGES
        )
        + f" | {r['stages']['model_threads']} |"
        for r in runs
    ]
    intro = (
        "\n\nWhere the time went (`bench/stages.py`: ms per image in the measured passes, "
        "medians; with two model threads, calls overlap and the figures are thread time; "
        "JPEG decoding, on the decode workers beside the model, "
        f"{model['image_decoding_ms']:.0f} ms an image alone):"
    )
    return table(intro, ["mode", "batch", *STAGES.values(), "model threads"], rows, left=1)


@renderer("cpu-blip2")
def cpu_blip2(results: Path) -> str:
    name = "speed-cpu-blip2.json"
    report = load(results, name)
    model = speed_model(report, "blip2-opt-2.7b")
    base = model["baseline"]
    weights = model["weights_gib"]
    intro = (
        f"`python bench/speed.py --models blip2-opt-2.7b --modes int8 --batches 1 8 --no-guard` "
        f"({cpu_machine(report)}; `bench/results/{name}`): full-size BLIP-2 OPT-2.7b "
        f"({model['parameters'] / 1e9:.1f} B parameters, random weights), "
        f"{report['tokens']} tokens a caption, one pass (a second float32 copy for "
        "interleaved passes does not fit in 24 GB)."
    )
    loop = (
        f"| the catalog's loop (float32) | 1 | {base['images_per_s']:.3f} | 1.00x | "
        f"{base['latency_p50_s']:.1f} s | {model['float32_weights_gib']:.2f} GiB |"
    )
    rows = [
        f"| blipserve {r['dtype']} | {r['batch']} | {r['images_per_s']:.3f} | "
        f"{r['ratio']:.2f}x | {r['single_latency_p50_s']:.1f} s "
        f"({r['latency_ratio']:.2f}x lower) | {weights[r['dtype']]:.2f} GiB |"
        for r in model["blipserve"]
    ]
    peak = model["memory_at_end"]["peak_rss_gib"]
    columns = ["", "batch", "images/s", "x the loop", "one image", "weights"]
    after = f"Process peak (the float32 baseline included): {peak:.1f} GiB."
    return table(intro, columns, [loop, *rows], after)


ENCODERS = {
    "torch-int8": "torch, blipserve's int8 kernel",
    "ov-bf16": "OpenVINO bfloat16",
    "ov-int8-static": "OpenVINO static int8 (NNCF, project's recipe)",
    "ov-int8-dynamic": "OpenVINO dynamic int8",
    "ov-nncf-preset": "OpenVINO static int8 (NNCF's transformer preset)",
}


@renderer("cpu-encoder")
def cpu_encoder(results: Path) -> str:
    blip = load(results, "openvino-encoder-2.json")
    blip2 = load(results, "openvino-encoder-blip2.json")
    intro = (
        "`python bench/openvino_encoder.py` (BLIP-base's ViT, full size; "
        "`openvino-encoder-2.json`) and `--layout blip2-opt-2.7b` (ViT-g at its real width, "
        f"two layers; `openvino-encoder-blip2.json`); {cpu_machine(blip)}; ms per image, "
        "medians of interleaved passes; cosine: the worst of 8 photographs' features "
        "against float32."
    )
    rows = []
    for key, label in ENCODERS.items():
        a, b = blip["results"].get(key), blip2["results"].get(key)
        if a is None:
            continue
        right = (
            f"{b['median_ms']['1']:.0f} / {b['median_ms']['8']:.0f} | {b['cosine_worst']:.5f}"
            if b
            else "| "
        )
        rows.append(
            f"| {label} | {a['median_ms']['1']:.0f} / {a['median_ms']['8']:.0f} | "
            f"{a['cosine_worst']:.5f} | {right} |"
        )
    columns = ["vision encoder", "BLIP-base batch 1 / 8", "cosine", "ViT-g batch 1 / 8", "cosine"]
    return table(intro, columns, rows)


@renderer("gpu")
def gpu(results: Path) -> str:
    name = "gpu-h200.json"
    r = load(results, name)
    names = {"blip-image-captioning-base": "BLIP-base", "blip2-opt-2.7b": "BLIP-2 OPT-2.7b"}
    intro = (
        f"`python bench/speed.py` on one {r['gpu']} (torch {r['machine']['torch']}; "
        f"`bench/results/{name}`): full-size architectures with random weights, "
        f"{r['tokens']} tokens a caption, base64 640x480 JPEGs through the engine; the "
        "catalog's float32 loop in the same process."
    )
    rows = []
    for m in r["models"]:
        label = f"{names.get(m['layout'], m['layout'])} ({m['parameters'] / 1e9:.2f} B)"
        b = m["baseline"]
        rows.append(
            f"| {label} | the catalog's loop, float32 | 1 | {b['images_per_s']:.1f} | 1.0x | "
            f"{b['latency_p50_s'] * 1000:.0f} ms |"
        )
        for x in m["blipserve"]:
            one = f"{x['single_latency_p50_s'] * 1000:.0f} ms" if x["batch"] == 1 else ""
            rows.append(
                f"| | blipserve {m['dtype']} | {x['batch']} | {x['images_per_s']:.1f} | "
                f"{x['ratio']:.1f}x | {one} |"
            )
    memory = ", ".join(
        f"{names.get(m['layout'], m['layout'])} {m['peak_gpu_memory_gib']:.1f} GiB"
        for m in r["models"]
    )
    guard = r["quality_guard"]
    after = (
        f"Peak GPU memory: {memory}. Quality guard (`demo`, {guard['scenes']} held-out "
        f"scenes): bfloat16 captions equal float32's for "
        f"{guard['bfloat16']['same_as_float32']:.1%}, float16's for "
        f"{guard['float16']['same_as_float32']:.1%}."
    )
    columns = ["model", "mode", "batch", "images/s", "x the loop", "one image"]
    return table(intro, columns, rows, after, left=2)


@renderer("gpu-cuda-graphs")
def gpu_cuda_graphs(results: Path) -> str:
    name = "gpu-h200-cuda-graphs-paired.json"
    r = load(results, name)
    model = speed_model(r, "blip2-opt-2.7b")
    intro = (
        f"`bench/speed.py --models blip2-opt-2.7b --static-cache --repeats {r['repeats']}` on "
        f"one {r['gpu']} (`bench/results/{name}`): eager and compiled back to back "
        f"{len(model['blipserve_static_cache'][0]['gain_runs'])} times per size; the gain "
        "is the median of the pairs' ratios."
    )
    rows = [
        f"| {x['batch']} | {x['eager_images_per_s']:.1f} | {x['images_per_s']:.1f} | "
        f"{x['gain']:.2f}x{span(x['gain_runs'])} | {x['wall_with_compile_s']:.0f} s |"
        for x in model["blipserve_static_cache"]
    ]
    sc = r["static_cache_guard"]
    after = (
        f"The catalog's loop: {model['baseline']['images_per_s']:.1f} images/s in the same "
        f"run. `demo-vqa` ({sc['dtype']}) says the same with and without `--cuda-graphs` for "
        f"{sc['same']:.1%} of {sc['rows']} captions and answers."
    )
    columns = [
        "batch",
        "bfloat16 (eager) images/s",
        "with `--cuda-graphs`",
        "gain (range)",
        "first call",
    ]
    return table(intro, columns, rows, after, left=0)


@renderer("cpu-load-memory")
def cpu_load_memory(results: Path) -> str:
    reports = [load(results, f"load-memory-blip2-{d}.json") for d in ("f32", "f16")]
    first = reports[0]
    intro = (
        "`python bench/load_memory.py --folder DIR --stored float32|float16 --modes ... "
        f"--baseline-src OLD/src --repeats {first['results']['this int8']['runs']}` "
        f"({cpu_machine(first)}; `bench/results/load-memory-blip2-f32.json`, `-f16.json`): "
        "full-size BLIP-2 OPT-2.7b (random weights) saved by `save_pretrained`, built by "
        "`build_model` in fresh processes, this release against the one before it "
        "alternately; medians (the first load of each mode, which converts the vision "
        "encoder for OpenVINO, apart). Anonymous memory is what the process holds itself; "
        "resident adds the checkpoint's file pages read through its memory map (page cache)."
    )
    names = {"baseline": "before", "this": "now"}
    rows = []
    for report in reports:
        stored = report["checkpoint"]["stored"]
        size = report["checkpoint"]["safetensors_gib"]
        for key, r in report["results"].items():
            tree, mode = key.split(" ", 1)
            rows.append(
                f"| {stored} ({size:.1f} GiB) | {mode} | {names[tree]} | "
                f"{r['load_s']['median']:.0f} s | {r['weights_gib']['median']:.2f} GiB | "
                f"{_gib_range(r['peak_anon_gib'])} ({r['peak_anon_per_weights']:.2f}x) | "
                f"{_gib_range(r['peak_rss_gib'])} | {_gib_range(r['end_rss_gib'])} |"
            )
    columns = [
        "checkpoint",
        "mode",
        "blipserve",
        "load",
        "weights",
        "peak anonymous (x weights)",
        "peak resident",
        "resident after",
    ]
    return table(intro, columns, rows, left=3)


def _gib_range(figure: dict[str, float]) -> str:
    """A median in GiB, with the range of the runs where they differ."""
    low, high = f"{figure['min']:.1f}", f"{figure['max']:.1f}"
    spread = "" if low == high else f" ({low}-{high})"
    return f"{figure['median']:.1f} GiB{spread}"
