"""Memory while loading: a checkpoint on disk built into a model by ``build_model``, as
``blipserve serve`` loads it, in fresh processes (issue 34).

The checkpoint: a published layout (``tests/data/hf-layouts``) with random weights, saved by
``save_pretrained`` in the dtype its hub checkpoint is stored in (``--stored float32``: the
hub's BLIP-2 OPT-2.7b files are float32, 15.5 GB) or another (``--stored float16``: the
half-precision copies users make); made once under ``--folder``.  ``--layers TEXT,VISION``
shrinks it (e.g. ``8,10``: 1.1 B parameters) for quick runs.

Each load is a fresh process that samples its own memory every 10 ms while it builds:
peak anonymous memory (what the process itself holds: the weights it made, its copies,
the allocator's garbage), peak resident memory (``VmHWM``: anonymous plus the checkpoint's
file pages it has read through its memory map, which are page cache the kernel may drop),
and both at the end, beside the model's weight bytes.  ``--baseline-src`` runs the same
loads with another checkout's ``src/`` (e.g. a ``git worktree`` of the previous commit) in
the same run, alternating with this checkout's, ``--repeats`` times; the first load of each
mode is a warm-up (OpenVINO's conversion, cached afterwards) and is reported apart.

    python bench/load_memory.py --folder ~/.cache/blipserve-bench/blip2-full-f32 \\
        --modes int8,int8+ov --baseline-src /tmp/old/src --repeats 3 \\
        --out bench/results/load-memory-blip2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_models import memory_gib, weight_bytes

ROOT = Path(__file__).resolve().parents[1]

_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def make_checkpoint(folder: Path, layout: str, stored: str, layers: str | None) -> None:
    """A random-weight ``layout`` saved in ``stored`` dtype into ``folder`` (once)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from testkit.models import LAYOUTS

    if (folder / "config.json").exists():
        return
    config = AutoConfig.from_pretrained(LAYOUTS / layout)
    if layers:
        text, vision = (int(n) for n in layers.split(","))
        config.text_config.num_hidden_layers = text
        config.vision_config.num_hidden_layers = vision
    # (transformers draws BLIP-2's vision weights with std 1e-10; real ones are ~1e-2)
    config.vision_config.initializer_range = 0.02
    torch.manual_seed(0)
    model_cls = getattr(transformers, (config.architectures or [""])[0])
    model = model_cls(config).eval().to(getattr(torch, stored))
    model.save_pretrained(folder, max_shard_size="10GB")
    AutoProcessor.from_pretrained(LAYOUTS / layout).save_pretrained(folder)


def child(folder: str, mode: str) -> dict[str, Any]:
    """Build ``folder`` in ``mode`` (``int8``, ``int8+ov``, a dtype) here; what it took."""
    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in memory_gib(*_FIELDS).items():
                peaks[key] = max(peaks.get(key, 0.0), value)
            time.sleep(0.01)

    before = memory_gib(*_FIELDS)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    from blipserve.config import ModelConfig
    from blipserve.models import build_model

    dtype, ov, _ = mode.partition("+ov")
    start = time.perf_counter()
    adapter = build_model(
        ModelConfig(model=folder, dtype=dtype, backend="openvino" if ov else "torch")  # type: ignore[arg-type]
    )
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    end = memory_gib(*_FIELDS)
    return {
        "load_s": seconds,
        "weights_gib": weight_bytes(adapter.model) / 2**30,
        "peak_anon_gib": peaks["RssAnon"],
        "peak_rss_gib": end["VmHWM"],
        "end_anon_gib": end["RssAnon"],
        "end_rss_gib": end["VmRSS"],
        "end_file_gib": end["RssFile"],
        "before_anon_gib": before["RssAnon"],
        # whether the checkpoint's files are still mapped into the process after the build
        "checkpoint_mapped": folder in Path("/proc/self/maps").read_text(),
        "build": [step.as_dict() for step in adapter.build],
    }


def run_child(src: Path, folder: Path, mode: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), "--mode", mode],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"load failed ({src}, {mode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges of each figure over ``runs``."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, float) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["checkpoint_mapped_runs"] = sum(r["checkpoint_mapped"] for r in runs)
    out["peak_anon_per_weights"] = statistics.median(
        r["peak_anon_gib"] / r["weights_gib"] for r in runs
    )
    out["peak_rss_per_weights"] = statistics.median(
        r["peak_rss_gib"] / r["weights_gib"] for r in runs
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="the checkpoint (made here if missing)")
    parser.add_argument("--layout", default="blip2-opt-2.7b")
    parser.add_argument("--stored", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layers", help="TEXT,VISION hidden layers (default: the layout's)")
    parser.add_argument("--modes", default="int8,int8+ov")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/ to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.mode)))
        return
    from common import machine_info

    if args.folder is None:
        parser.error("--folder is required")
    make_checkpoint(args.folder, args.layout, args.stored, args.layers)
    trees = {"this": ROOT / "src"}
    if args.baseline_src:
        trees = {"baseline": args.baseline_src.resolve(), **trees}
    modes = args.modes.split(",")
    warm: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats + 1):
        for mode in modes:
            for tree, src in trees.items():
                result = run_child(src, args.folder, mode)
                print(
                    f"[load {time.strftime('%H:%M:%S')}] {tree} {mode} #{repeat}: "
                    f"{result['load_s']:.1f} s, weights {result['weights_gib']:.2f} GiB, peak "
                    f"anon {result['peak_anon_gib']:.2f} rss {result['peak_rss_gib']:.2f}, end "
                    f"anon {result['end_anon_gib']:.2f} rss {result['end_rss_gib']:.2f} GiB",
                    file=sys.stderr,
                    flush=True,
                )
                if repeat == 0:
                    warm[f"{tree} {mode}"] = result
                else:
                    runs.setdefault(f"{tree} {mode}", []).append(result)
    size = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    report = {
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "checkpoint": {
            "layout": args.layout,
            "stored": args.stored,
            "layers": args.layers or "as published",
            "safetensors_gib": size / 2**30,
        },
        "first_loads": warm,
        "results": {key: summary(value) for key, value in runs.items()},
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
