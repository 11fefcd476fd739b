"""bench/batch.py's report: what every report states (its head), and the markdown of a
run against the loop and of a local-folder vs Azurite run."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import machine_info


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
