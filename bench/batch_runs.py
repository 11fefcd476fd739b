"""bench/batch.py's measurements: the catalog's per-image loop, `blipserve batch` as a
subprocess (from a local folder or, alternately, from Azurite), and blipserve's stages one
by one in this process."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import python_command
from PIL import Image


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


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median speed among passes of the same flags (all of them kept)."""
    ranked = sorted(runs, key=lambda run: run["images_per_s"])
    return {**ranked[len(ranked) // 2], "passes_images_per_s": [r["images_per_s"] for r in runs]}
