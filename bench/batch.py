"""Benchmark `blipserve batch` against the catalog's per-image loop, side by side.

The input: a folder of ``--images`` (default 64) large JPEGs (default 4000x3000, about
12 MP; made once by this script from scikit-image sample photos, cached).  The model: a
random-weight copy of ``Salesforce/blip-image-captioning-base`` built from its published
config, tokenizer and processor settings (full size, 384 px ViT-B/16).  Every caption is
exactly ``--tokens`` tokens long (``min_new_tokens = max_new_tokens``) on both sides, so
both do the same model work.

* **loop** (the baseline; what the catalog's scoring wrapper does per image):
  ``Image.open(path).convert("RGB")``, ``processor(images=..., return_tensors="pt")``,
  ``model.generate(...)``, ``processor.batch_decode(...)``; float32, one image at a time.
* **blipserve**: ``blipserve batch FOLDER -o out.jsonl --model MODEL`` as a user runs it
  (a subprocess, its defaults plus ``--blipserve-args``); its own summary line gives the
  elapsed time, which excludes loading the model, as the loop's timing does.

Then, "where the time goes": the same work split into its stages, measured one by one in
this process with blipserve's own functions (image decode with draft mode, the vision
encoder at the engine's batch size, the text decoder's generation) and, for comparison,
the loop's decode (full-size PIL decode + the processor's resize).

    .venv/bin/python bench/batch.py                     # full run (~5 min on 2 cores)
    .venv/bin/python bench/batch.py --images 8 --quick  # smoke test with a tiny model
    .venv/bin/python bench/batch.py --source both       # local folder vs Azurite, interleaved

``--source azurite`` reads the same JPEGs from Azure Blob Storage instead: Azurite (the
emulator the tests use, installed by scripts/install_azurite.sh) started on a loopback
port, the files uploaded once, ``blipserve batch az://...`` with the credentials in the
environment.  ``--source both`` runs the local folder and the store alternately
``--repeats`` times (no loop baseline) and reports the store's images/s as a ratio of the
local run's, pass by pass: what reading from an object store costs.

On a GPU (issue 22): ``--device cuda`` runs the loop there (float32, one image at a time,
as the catalog's GPU deployments do) and ``blipserve batch --device cuda``; ``--layout
blip2-opt-2.7b`` benchmarks BLIP-2 instead; each ``--compare FLAGS`` is one more
``blipserve batch`` with those flags added, and with ``--repeats N`` the runs alternate N
times (each run's images/s over the loop's, medians reported), e.g.::

    python bench/batch.py --device cuda --size 640x480 --images 2048 --repeats 3 \
        --compare "--image-resize processor" --compare "--max-batch-size 32"

Run it on a quiet machine; the background load is measured and reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (
    CACHE,
    QUICK_BLIP,
    QUICK_BLIP2,
    background_cpu_busy,
    build_random_model,
    machine_info,
    python_command,
)

from testkit.photos import photo

LAYOUTS = {"blip-image-captioning-base": QUICK_BLIP, "blip2-opt-2.7b": QUICK_BLIP2}
_DTYPES = {"float32", "bfloat16", "float16", "int8"}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def make_jpegs(folder: Path, count: int, size: tuple[int, int], quality: int = 92) -> list[Path]:
    """``count`` large JPEGs from scikit-image's photos, upscaled, with light noise (so the
    files are as big as real camera photos); cached by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"photo-{i:03d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        image = photo(PHOTOS[i % len(PHOTOS)])
        big = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        big = big + rng.integers(-6, 7, big.shape, dtype=np.int16)
        if i // len(PHOTOS) % 2:
            big = big[:, ::-1]
        tmp = path.with_suffix(".tmp")
        Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=quality)
        tmp.rename(path)
    return paths


def run_loop(model_dir: Path, paths: list[Path], tokens: int, device: str) -> dict[str, Any]:
    """The baseline: one image at a time, as the catalog's scoring wrapper does."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    processor: Any = AutoProcessor.from_pretrained(model_dir)
    architecture = AutoConfig.from_pretrained(model_dir).architectures[0]
    model_cls = getattr(transformers, architecture)
    model: Any = model_cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    params = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    with torch.inference_mode():  # warm-up, as blipserve's engine does before its job
        warm = processor(images=Image.new("RGB", (64, 64)), return_tensors="pt").to(device)
        model.generate(**warm, max_new_tokens=2)
    start = time.perf_counter()
    texts = []
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            inputs = processor(images=image, return_tensors="pt").to(device)
            out = model.generate(**inputs, **params)
            texts += processor.batch_decode(out, skip_special_tokens=True)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "images_per_s": len(paths) / elapsed, "captions": len(texts)}


SUMMARY = re.compile(
    r"blipserve batch: done (\d+), failed (\d+).*elapsed ([\d.]+) s, ([\d.]+) images/s"
)


def run_blipserve(
    model_dir: Path, folder: Path | str, tokens: int, extra: list[str], work: Path
) -> dict[str, Any]:
    out = work / "captions.jsonl"
    argv = python_command(
        "-m",
        "blipserve.cli",
        "batch",
        str(folder),
        "-o",
        str(out),
        "--overwrite",
        "--no-progress",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        str(tokens),
        "--min-new-tokens",
        str(tokens),
        *extra,
    )
    wall = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        raise RuntimeError(f"blipserve batch failed:\n{proc.stderr}")
    match = SUMMARY.search(proc.stderr)
    if not match:
        raise RuntimeError(f"no summary line in blipserve's output:\n{proc.stderr}")
    done, failed, elapsed, rate = match.groups()
    if int(failed):
        raise RuntimeError(f"{failed} images failed:\n{out.read_text()[:2000]}")
    return {
        "argv": shlex.join(argv[1:]),
        "done": int(done),
        "elapsed_s": float(elapsed),
        "images_per_s": float(rate),
        "wall_with_model_load_s": round(wall, 1),
    }


def run_sources(
    model_dir: Path, images: Path, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """blipserve batch over the same files from the local folder and from Azurite,
    alternately; per pass, the store's images/s over the local run's just before it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import os

    import stores

    why = stores.available("azure")
    if why:
        raise SystemExit(f"--source azurite: {why}")
    emulator = stores.start_emulator("azure", work)
    try:
        bucket = emulator.new_bucket()
        fs = emulator.filesystem()
        start = time.perf_counter()
        for path in sorted(images.iterdir()):
            fs.put_file(str(path.resolve()), f"{bucket.split('://')[1]}/photos/{path.name}")
        upload_s = time.perf_counter() - start
        os.environ.update(emulator.env)  # credentials as a user sets them
        extra = shlex.split(args.blipserve_args)
        passes = []
        for n in range(args.repeats):
            local = run_blipserve(model_dir, images, args.tokens, extra, work)
            store = run_blipserve(model_dir, f"{bucket}/photos", args.tokens, extra, work)
            passes.append({"local": local, "azurite": store})
            ratio = store["images_per_s"] / max(local["images_per_s"], 1e-9)
            print(
                f"  pass {n + 1}: local {local['images_per_s']:.3f}, azurite "
                f"{store['images_per_s']:.3f} images/s ({ratio:.3f}x)",
                file=sys.stderr,
            )
    finally:
        emulator.stop()
    ratios = [p["azurite"]["images_per_s"] / max(p["local"]["images_per_s"], 1e-9) for p in passes]
    return {"passes": passes, "ratios": ratios, "upload_s": round(upload_s, 1)}


def sources_markdown(report: dict[str, Any]) -> str:
    m, src = report["machine"], report["sources"]
    rows = [
        f"| {n + 1} | {p['local']['images_per_s']:.3f} | {p['azurite']['images_per_s']:.3f} "
        f"| {r:.3f}x |"
        for n, (p, r) in enumerate(zip(src["passes"], src["ratios"], strict=True))
    ]
    median = float(np.median(src["ratios"]))
    return "\n".join(
        [
            f"`blipserve batch` from a local folder and from Azure Blob Storage (Azurite on "
            f"loopback): {report['images']} JPEGs of {report['image_size'][0]}x"
            f"{report['image_size'][1]} ({report['image_mb']} MB each), {report['model']}, "
            f"{report['tokens']} tokens per caption; {m['cpu']}, {m['usable_cores']} cores; "
            f"{report['date']}; background load {report['background_busy']:.0%}.",
            "",
            "| pass | local images/s | azurite images/s | azurite / local |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Median ratio {median:.3f}x (upload of the files beforehand: {src['upload_s']} s).",
            "",
            f"Command: `{report['command']}`",
        ]
    )


def where_time_goes(
    model_dir: Path, paths: list[Path], tokens: int, dtype: str, device: str
) -> dict[str, Any]:
    """Each stage alone, per image: blipserve's decode, the loop's decode, vision, text."""
    import torch
    from transformers import AutoProcessor

    from blipserve.config import EngineConfig, ImageLimits, ModelConfig
    from blipserve.engine import default_batch_size
    from blipserve.images import load_image
    from blipserve.models import build_model

    model_config = ModelConfig(model=str(model_dir), device=device, dtype=dtype)  # type: ignore[arg-type]
    adapter: Any = build_model(model_config)
    batch = EngineConfig().max_batch_size or default_batch_size(adapter.device)
    sample = paths[:batch]
    limits = ImageLimits()
    out: dict[str, Any] = {"dtype": str(adapter.precision), "batch": batch}

    start = time.perf_counter()
    images = [
        load_image(
            str(p), limits=limits, fetcher=None, target_size=adapter.image_size, allow_paths=True
        )
        for p in sample
    ]
    out["blipserve_decode_s"] = (time.perf_counter() - start) / len(sample)

    processor: Any = AutoProcessor.from_pretrained(model_dir)
    start = time.perf_counter()
    for p in sample:
        processor(images=Image.open(p).convert("RGB"), return_tensors="pt")
    out["loop_decode_and_preprocess_s"] = (time.perf_counter() - start) / len(sample)

    model = adapter.model
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(adapter.device, adapter.dtype)

    def sync() -> None:  # (GPU work is asynchronous: wait for it before reading the clock)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model.vision_model(pixel_values=pixels)  # warm-up
        sync()
        start = time.perf_counter()
        model.vision_model(pixel_values=pixels)
        sync()
        vision = (time.perf_counter() - start) / len(sample)
        start = time.perf_counter()
        model.generate(pixel_values=pixels, max_new_tokens=tokens, min_new_tokens=tokens)
        sync()
        total = (time.perf_counter() - start) / len(sample)
    out["vision_s"] = vision
    out["text_s"] = total - vision
    return out


def markdown(report: dict[str, Any]) -> str:
    loop, ours = report["loop"], report["blipserve"]
    stages = report["stages"]
    m = report["machine"]
    lines = [
        f"`blipserve batch` vs the catalog's per-image loop: {report['images']} JPEGs of "
        f"{report['image_size'][0]}x{report['image_size'][1]}, {report['model']}, "
        f"{report['tokens']} tokens per caption; {m['cpu']}, {m['usable_cores']} cores, "
        f"torch {m['torch']}; {report['date']}; background load "
        f"{report['background_busy']:.0%}.",
        "",
        "| | images/s | s/image | ratio |",
        "|---|---|---|---|",
        f"| loop (float32, one at a time) | {loop['images_per_s']:.3f} | "
        f"{1 / loop['images_per_s']:.2f} | 1.00x |",
        f"| blipserve batch ({stages['dtype']}, batch {stages['batch']}) | "
        f"{ours['images_per_s']:.3f} | {1 / ours['images_per_s']:.2f} | "
        f"{ours['images_per_s'] / loop['images_per_s']:.2f}x |",
        *(
            f"| blipserve batch `{c['flags']}` | {c['images_per_s']:.3f} | "
            f"{1 / c['images_per_s']:.2f} | {c['images_per_s'] / loop['images_per_s']:.2f}x |"
            for c in report.get("compare", [])
        ),
        "",
        "Where blipserve's time goes, per image (each stage alone, one after the other):",
        "",
        "| stage | s/image |",
        "|---|---|",
        f"| image decode (draft mode), blipserve | {stages['blipserve_decode_s']:.3f} |",
        f"| image decode + processor (the loop's way) | "
        f"{stages['loop_decode_and_preprocess_s']:.3f} |",
        f"| vision encoder (batch {stages['batch']}) | {stages['vision_s']:.3f} |",
        f"| text decoder, {report['tokens']} tokens (batch {stages['batch']}) | "
        f"{stages['text_s']:.3f} |",
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median speed among passes of the same flags (all of them kept)."""
    ranked = sorted(runs, key=lambda run: run["images_per_s"])
    return {**ranked[len(ranked) // 2], "passes_images_per_s": [r["images_per_s"] for r in runs]}


def report_head(args: argparse.Namespace, paths: list[Path], busy: float) -> dict[str, Any]:
    """What every report states: when, where, on what input and model, and how to rerun."""
    width, height = (int(v) for v in args.size.lower().split("x"))
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "background_busy": busy,
        "images": args.images,
        "image_size": [width, height],
        "image_mb": round(sum(p.stat().st_size for p in paths) / len(paths) / 1e6, 2),
        "model": f"random-weight {args.layout}" + (" (tiny)" if args.quick else ""),
        "device": args.device,
        "tokens": args.tokens,
        "command": shlex.join(["python", "bench/batch.py", *sys.argv[1:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="4000x3000", help="JPEG size, WxH (default 12 MP)")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a tiny model of the same layout")
    parser.add_argument("--blipserve-args", default="", help="extra flags for blipserve batch")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument(
        "--source",
        choices=("local", "azurite", "both"),
        default="local",
        help="where blipserve reads the JPEGs (both: local and Azurite, alternately)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="passes with --source both or --compare"
    )
    parser.add_argument(
        "--loop-images", type=int, help="the loop's images, the first of the folder (default all)"
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="blip-image-captioning-base")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="FLAGS",
        help="one more blipserve batch run with these flags added (repeatable)",
    )
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    folder = CACHE / f"jpegs-{width}x{height}"
    paths = make_jpegs(folder, args.images, (width, height))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = work / "images"  # exactly --images files (the cache may hold more)
        images.mkdir()
        for p in paths:
            (images / p.name).symlink_to(p)
        model_dir = build_random_model(  # the same cached folders as bench/server.py's
            args.layout,
            CACHE / (args.layout + ("-quick" if args.quick else "")),
            overrides=LAYOUTS[args.layout] if args.quick else None,
        )
        busy = background_cpu_busy()
        if args.source != "local":
            if args.source == "azurite":
                args.repeats = 1
            print(f"background load {busy:.0%}; local and azurite ...", file=sys.stderr)
            sources = run_sources(model_dir, images, args, work)
            report = {**report_head(args, paths, busy), "sources": sources}
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(sources_markdown(report))
            return
        print(f"background load {busy:.0%}; blipserve batch ...", file=sys.stderr)
        flags = [*shlex.split(args.blipserve_args), "--device", args.device]
        variants = [flags, *([*flags, *shlex.split(c)] for c in args.compare)]
        runs: list[list[dict[str, Any]]] = [[] for _ in variants]
        for _ in range(args.repeats if args.compare else 1):  # alternating, pass by pass
            for variant, done in zip(variants, runs, strict=True):
                done.append(run_blipserve(model_dir, images, args.tokens, variant, work))
                print(f"  {done[-1]['images_per_s']:.3f} images/s", file=sys.stderr)
        ours, *others = [_median_run(done) for done in runs]
        print("  loop ...", file=sys.stderr)
        loop = run_loop(model_dir, paths[: args.loop_images or None], args.tokens, args.device)
        print(f"  {loop['images_per_s']:.3f} images/s; stages ...", file=sys.stderr)
        dtype = next(
            (a for a in (*shlex.split(args.blipserve_args), "auto") if a in _DTYPES), "auto"
        )
        stages = where_time_goes(model_dir, paths, args.tokens, dtype, args.device)
    report = {
        **report_head(args, paths, busy),
        "loop": loop,
        "blipserve": ours,
        "ratio": ours["images_per_s"] / loop["images_per_s"],
        "stages": stages,
    }
    if others:
        report["compare"] = [
            {"flags": flags, **run} for flags, run in zip(args.compare, others, strict=True)
        ]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
