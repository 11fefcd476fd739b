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
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from batch_report import markdown, report_head, sources_markdown
from batch_runs import median_run, run_blipserve, run_loop, run_sources, where_time_goes
from common import CACHE, QUICK_BLIP, QUICK_BLIP2, background_cpu_busy, build_random_model

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
        ours, *others = [median_run(done) for done in runs]
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
