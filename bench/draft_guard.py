"""What JPEG draft decoding does to the model's input: vision features, draft vs full decode.

For BLIP-base's ViT (384 px, all layers) and BLIP-2's ViT-g (224 px, its real width, two
layers), random weights from the published configs (tests/data/hf-layouts): six ordinary
photographs (scikit-image, scikit-learn) saved as JPEG (quality 90) at several sizes,
decoded by :func:`blipserve.images.decode_image` with and without ``draft_decode``, then
through the model's own processor and encoder.  Reports, per size, the decoded size, the
worst photo's feature cosine (draft vs full) and the decode times.

    .venv/bin/python bench/draft_guard.py
    .venv/bin/python bench/draft_guard.py --quick --out /tmp/q.json   # tiny encoders, 2 sizes
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from blipserve.config import ImageLimits
from blipserve.images import decode_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # testkit/, shared with the tests

from testkit.models import random_vision_encoder  # noqa: E402
from testkit.photos import photos  # noqa: E402

SIZES = ((640, 480), (1024, 768), (2000, 1500), (4000, 3000))
#: --quick: each encoder at its real input size, shrunk to a tiny network
QUICK_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny encoders, the 2 smallest sizes")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    pictures = [p.convert("RGB") for p in photos().values()]
    rows: list[dict[str, Any]] = []
    for layout in ("blip2-opt-2.7b", "blip-image-captioning-base"):
        model, processor = random_vision_encoder(layout, QUICK_VISION if args.quick else None)
        side = processor.image_processor.size["height"]
        for size in SIZES[:2] if args.quick else SIZES:
            jpegs = []
            for picture in pictures:
                buf = io.BytesIO()
                picture.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                jpegs.append(buf.getvalue())
            features, times, decoded = {}, {}, {}
            for draft in (False, True):
                limits = ImageLimits(draft_decode=draft)
                start = time.perf_counter()
                images = [decode_image(data, limits, target_size=side) for data in jpegs]
                times[draft] = (time.perf_counter() - start) / len(jpegs)
                decoded[draft] = images[0].size
                pixels = processor(images=images, return_tensors="pt")["pixel_values"]
                with torch.no_grad():
                    out = model(pixel_values=pixels).last_hidden_state  # (6, N, D)
                features[draft] = out.flatten(1).double()
            cosine = torch.nn.functional.cosine_similarity(features[True], features[False])
            print(
                f"{layout} ({side} px) JPEG {size[0]}x{size[1]}: decoded at {decoded[True]} "
                f"(full: {decoded[False]}); worst feature cosine {float(cosine.min()):.5f}; "
                f"decode {1000 * times[True]:.1f} ms vs {1000 * times[False]:.1f} ms",
                flush=True,
            )
            rows.append(
                {
                    "layout": layout,
                    "side": side,
                    "jpeg_size": list(size),
                    "decoded": list(decoded[True]),
                    "decoded_full": list(decoded[False]),
                    "worst_cosine": float(cosine.min()),
                    "draft_decode_ms": 1000 * times[True],
                    "full_decode_ms": 1000 * times[False],
                }
            )
    if args.out:
        args.out.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
