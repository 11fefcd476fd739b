"""`blipserve score` as a user runs it, against the engine benchmark and the catalog's loop.

Issue 34 found that a whole `blipserve score` process ran slower per image than
`bench/speed.py` says the engine runs (6.9x against 8.8x the loop).  This measures the
three side by side, interleaved in each of ``--repeats`` passes, on one model folder:

* **loop**: the catalog's per-image loop in this process (float32, one image per
  ``generate``; ``speed_runs.baseline``) over ``--loop-images`` of the photographs;
* **score**: ``blipserve score --model FOLDER REQUEST`` as a subprocess, timed whole, once
  with a request of ``--images`` JPEGs and once with one.  Start-up (imports, loading and
  quantizing the model) is cancelled by the difference: ``(t(N) - t(1)) / (N - 1)`` a
  image.  The request is what catalog clients send: 640x480 JPEG photographs in base64 as
  ``base64.encodebytes`` writes it (line breaks), ``min_new_tokens = max_new_tokens``;
* **engine**: ``Engine.from_settings`` with the same command line's settings, in this
  process, warmed up at its batch size, then ``score`` on the same request (what
  `bench/speed.py` times, on this request's rows).

Each figure is a median over passes; each ratio ("x the loop") the median of the passes'
own ratios.  ``score_vs_engine`` is what the whole process loses to the engine alone.

    python bench/score.py --repeats 3 --out bench/results/score-cpu.json
    python bench/score.py --quick --images 9 --repeats 1     # tiny model: a smoke test
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from common import (
    CACHE,
    QUICK_BLIP,
    background_cpu_busy,
    build_random_model,
    log,
    machine_info,
    python_command,
    sample_images,
)

LAYOUT = "blip-image-captioning-base"


def request_body(images: list[str], tokens: int) -> dict[str, Any]:
    """A catalog request of ``images`` (base64 text), re-encoded as clients write it."""
    data = [[base64.encodebytes(base64.b64decode(b)).decode("ascii")] for b in images]
    return {
        "input_data": {"columns": ["image"], "index": list(range(len(images))), "data": data},
        "params": {"max_new_tokens": tokens, "min_new_tokens": tokens},
    }


def score_process(command: list[str], request: Path, rows: int) -> float:
    """Seconds a whole `blipserve score` process takes on ``request`` (checked: ``rows``
    answers)."""
    started = time.perf_counter()
    done = subprocess.run([*command, str(request)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"blipserve score failed ({done.returncode}): {done.stderr[-2000:]}")
    answers = json.loads(done.stdout)
    if len(answers) != rows or not all(a.get("text") for a in answers):
        raise SystemExit(f"blipserve score answered {len(answers)} rows of {rows}")
    return elapsed


def engine_pass(flags: list[str], request: Path, batch_rows: int) -> tuple[float, dict[str, Any]]:
    """Seconds ``Engine.score`` takes on ``request`` in this process after a warm-up at
    its batch size, with the settings ``blipserve score FLAGS`` would use; the engine's
    shape (dtype, workers, batch size)."""
    from blipserve.cli.parser import build_parser, settings_from_args
    from blipserve.contracts.catalog import ScoringRequest, parse_request
    from blipserve.engine import Engine

    settings = settings_from_args(build_parser().parse_args(["score", *flags, str(request)]))
    parsed = parse_request(request.read_text())
    with Engine.from_settings(settings) as engine:
        warm = ScoringRequest(parsed.rows[: min(batch_rows, engine.max_batch_size)], parsed.params)
        engine.score(warm)
        started = time.perf_counter()
        engine.score(parsed)
        elapsed = time.perf_counter() - started
        shape = {
            "precision": str(getattr(engine.adapter, "precision", engine.adapter.dtype)),
            "vision_backend": engine.adapter.vision_backend,
            "model_workers": engine.model_workers,
            "max_batch_size": engine.max_batch_size,
        }
    return elapsed, shape


def loop_pass(folder: Path, images: list[str], tokens: int) -> float:
    """Seconds an image of the catalog's loop (float32, in this process)."""
    from speed_runs import baseline
    from transformers import AutoProcessor, BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    result = baseline(model, processor, [base64.b64decode(b) for b in images], tokens)
    return 1.0 / float(result["images_per_s"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=49, help="rows in the large request")
    parser.add_argument("--loop-images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blipserve-args", default="", help="flags added to blipserve score")
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke test")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def ratio_summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    dest = CACHE / (LAYOUT + ("-quick" if args.quick else ""))
    folder = build_random_model(LAYOUT, dest, overrides=QUICK_BLIP if args.quick else None)
    images = sample_images(args.images)
    flags = ["--model", str(folder), *shlex.split(args.blipserve_args)]
    command = python_command("-m", "blipserve.cli", "score", *flags)
    busy = background_cpu_busy()
    passes: list[dict[str, Any]] = []
    shape: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        large, single = Path(tmp) / "large.json", Path(tmp) / "single.json"
        large.write_text(json.dumps(request_body(images, args.tokens)))
        single.write_text(json.dumps(request_body(images[:1], args.tokens)))
        for rep in range(args.repeats):
            loop_s = loop_pass(folder, images[: args.loop_images], args.tokens)
            log(f"pass {rep + 1}: loop {loop_s * 1e3:.0f} ms an image")
            whole_n = score_process(command, large, args.images)
            whole_1 = score_process(command, single, 1)
            score_s = (whole_n - whole_1) / (args.images - 1)
            log(
                f"pass {rep + 1}: blipserve score {whole_n:.1f} s for {args.images} rows, "
                f"{whole_1:.1f} s for 1: {score_s * 1e3:.0f} ms an image"
            )
            engine_total, shape = engine_pass(flags, large, args.images)
            engine_s = engine_total / args.images
            log(f"pass {rep + 1}: engine {engine_s * 1e3:.0f} ms an image ({shape})")
            passes.append(
                {
                    "loop_ms": loop_s * 1e3,
                    "score_whole_s": {str(args.images): whole_n, "1": whole_1},
                    "score_ms": score_s * 1e3,
                    "engine_ms": engine_s * 1e3,
                    "score_x_loop": loop_s / score_s,
                    "engine_x_loop": loop_s / engine_s,
                    "score_vs_engine": engine_s / score_s,
                }
            )
    summary = {
        key: ratio_summary([p[key] for p in passes])
        for key in ("loop_ms", "score_ms", "engine_ms", "score_x_loop", "engine_x_loop")
    }
    summary["score_vs_engine"] = ratio_summary([p["score_vs_engine"] for p in passes])
    summary["startup_s"] = ratio_summary(
        [p["score_whole_s"]["1"] - p["score_ms"] / 1e3 for p in passes]
    )
    report = {
        "command": shlex.join(sys.orig_argv),
        "machine": machine_info(),
        "background_cpu_busy": busy,
        "model": str(folder),
        "images": args.images,
        "tokens": args.tokens,
        "engine": shape,
        "passes": passes,
        "summary": summary,
    }
    for key, value in summary.items():
        print(f"{key:16} {value['median']:8.2f}  ({value['min']:.2f}-{value['max']:.2f})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
