"""Benchmark JPEG draft decoding: full decode + resize vs draft decode + resize.

Sample photos (scikit-image, scikit-learn) are upscaled to a large JPEG (default
4000x3000) and decoded with :func:`blipserve.images.decode_image` with and without
``draft_decode``, then resized to the model's input (384x384, bicubic, aspect ignored, as
the BLIP image processor does).  Reports the median times, their ratio and the mean
absolute difference of the two 384x384 results (0-255 scale).  Upscaled photos are
smooth, so a second variant adds sensor-like noise to give the JPEG real fine detail.

    .venv/bin/python bench/draft_decode.py [--repeat 5] [--size 4000x3000] [--processor]
    .venv/bin/python bench/draft_decode.py --repeat 1 --size 640x480 --out /tmp/q.json  # smoke
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from blipserve.config import ImageLimits
from blipserve.images import decode_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests

from testkit.photos import photo

TARGET = 384
PHOTOS = ("astronaut", "chelsea", "coffee", "china.jpg", "flower.jpg")


def sample_photos() -> dict[str, np.ndarray]:
    return {name.removesuffix(".jpg"): np.asarray(photo(name)) for name in PHOTOS}


def make_jpeg(photo: np.ndarray, size: tuple[int, int], noise: float, seed: int = 0) -> bytes:
    big = Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC)
    if noise:
        rng = np.random.default_rng(seed)
        noisy = np.asarray(big, dtype=np.float32) + rng.normal(0, noise, (size[1], size[0], 3))
        big = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def model_input(data: bytes, limits: ImageLimits) -> Image.Image:
    image = decode_image(data, limits, target_size=TARGET)
    return image.resize((TARGET, TARGET), Image.Resampling.BICUBIC)


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def processor_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean |difference| of the BLIP processor's normalised pixel_values for a and b."""
    try:
        from transformers import BlipImageProcessorPil as Processor
    except ImportError:
        from transformers import BlipImageProcessor as Processor
    processor = Processor()
    values = [processor(images=im, return_tensors="np")["pixel_values"] for im in (a, b)]
    return float(np.abs(values[0] - values[1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the test JPEGs")
    parser.add_argument(
        "--processor", action="store_true", help="also compare BLIP processor outputs"
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    full_limits, draft_limits = ImageLimits(draft_decode=False), ImageLimits(draft_decode=True)

    header = f"{'photo':<16}{'jpeg KB':>8}{'full ms':>9}{'draft ms':>9}{'speedup':>8}"
    header += f"{'drafted':>11}{'MAD':>7}{'max':>5}" + ("  proc MAD" if args.processor else "")
    print(
        f"{width}x{height} JPEG q90 -> decode -> {TARGET}x{TARGET} bicubic, median of "
        f"{args.repeat}\n{header}"
    )
    ratios, mads = [], []
    rows: list[dict[str, Any]] = []
    for name, picture in sample_photos().items():
        for noise in (0.0, 8.0):
            data = make_jpeg(picture, (width, height), noise)
            full = model_input(data, full_limits)
            draft = model_input(data, draft_limits)
            drafted = decode_image(data, draft_limits, target_size=TARGET).size
            t_full = median_seconds(functools.partial(model_input, data, full_limits), args.repeat)
            t_draft = median_seconds(
                functools.partial(model_input, data, draft_limits), args.repeat
            )
            diff = np.abs(np.asarray(full, np.int16) - np.asarray(draft, np.int16))
            ratios.append(t_full / t_draft)
            mads.append(float(diff.mean()))
            label = name + ("+noise" if noise else "")
            line = (
                f"{label:<16}{len(data) // 1024:>8}{t_full * 1000:>9.1f}{t_draft * 1000:>9.1f}"
                f"{t_full / t_draft:>7.1f}x{f'{drafted[0]}x{drafted[1]}':>11}"
                f"{diff.mean():>7.2f}{int(diff.max()):>5}"
            )
            row = {
                "photo": label,
                "jpeg_bytes": len(data),
                "full_ms": t_full * 1000,
                "draft_ms": t_draft * 1000,
                "drafted": list(drafted),
                "mean_abs_difference": float(diff.mean()),
                "max_abs_difference": int(diff.max()),
            }
            if args.processor:
                row["processor_mean_abs_difference"] = processor_difference(full, draft)
                line += f"{row['processor_mean_abs_difference']:>10.4f}"
            rows.append(row)
            print(line)
    print(
        f"mean speedup {statistics.mean(ratios):.1f}x, mean |pixel difference| "
        f"{statistics.mean(mads):.2f} / 255"
    )
    if args.out:
        report = {
            "jpeg_size": [width, height],
            "target": TARGET,
            "repeat": args.repeat,
            "rows": rows,
            "mean_speedup": statistics.mean(ratios),
            "mean_abs_difference": statistics.mean(mads),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
