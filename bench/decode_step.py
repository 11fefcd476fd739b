"""A decoding step of BLIP-base's text decoder against its floor, in each build (issue 34).

One process, BLIP-base's layout with random weights (``--quick``: tiny), built by
``build_model`` as a server builds it, in each ``--variants``: ``int8`` (what ``--dtype
auto`` gives on a CPU, the vision encoder on torch so that every variant shares it) and
``int8`` with one speed option left out by name (``--disable-speedup``), e.g. ``int8 -"bf16
image keys and values"``.  For each variant and row count: ``Engine.predict`` on base64
JPEG photographs with 1 and with 20 new tokens (``min_new_tokens = max_new_tokens``); a
step is their difference over 19.  Variants alternate within each of ``--repeats`` passes;
each figure is the median over passes, each ratio the median of the passes' ratios.

The floor: the time to read the decoder's int8 weights once at this machine's memory
bandwidth (a ``sum`` over a 512 MiB tensor, measured in the same run).

    python bench/decode_step.py --repeats 5 --out bench/results/decode-step-cpu.json
    python bench/decode_step.py --quick --repeats 1     # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, sample_images
from speed_models import build, left_out, log

LAYOUT = "blip-image-captioning-base"
BF16_KV = "bf16 image keys and values"


def variant_spec(variant: str) -> dict[str, Any]:
    """``int8`` or ``int8 -"NAME"`` (NAME left out) -> ModelConfig fields."""
    dtype, off = left_out(variant)
    return {"dtype": dtype, "disable_speedup": off}


def step_weight_bytes(decoder: Any) -> int:
    """Bytes of weights a decoding step reads: every Linear of the text decoder (int8: a
    byte a weight and 8 bytes an output; else its dtype's), the LM head included, but not
    the cross-attention's image key/value projections (run once a caption) nor the
    embedding table (a step gathers a row of it)."""
    from torch import nn

    from blipserve.models.int8_linear import Int8Linear

    total = 0
    for name, module in decoder.named_modules():
        if name.endswith(".kv"):
            continue
        if isinstance(module, Int8Linear):
            total += module.out_features * (module.in_features + 8)
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def bandwidth_gb_s(mib: int = 512, reps: int = 5) -> float:
    """Bytes read per second by ``sum`` over a tensor larger than any cache."""
    import torch

    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", help=f'default: int8, int8 -"{BF16_KV}"')
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke test")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from blipserve.config import EngineConfig, ModelConfig
    from blipserve.engine import Engine
    from blipserve.models import build_model
    from blipserve.models.precision import cpu_has_native_bf16
    from blipserve.params import GenerationParams
    from blipserve.types import RowInput

    # (the bf16 step is there only on CPUs with native bf16)
    args.variants = args.variants or ["int8", *([f'int8 -"{BF16_KV}"'] * cpu_has_native_bf16())]
    cpu = torch.device("cpu")
    model, processor = build(LAYOUT, args.quick, cpu)
    engines = {}
    for i, variant in enumerate(args.variants):
        spec = ModelConfig(model=LAYOUT, device="cpu", backend="torch", **variant_spec(variant))
        mine = model if i == len(args.variants) - 1 else _copy(model)
        adapter = build_model(spec, pretrained=(mine, processor))
        config = EngineConfig(max_batch_size=max(args.rows), model_workers=1)
        engines[variant] = Engine(adapter, config=config)
    decoder = next(iter(engines.values())).adapter.model.text_decoder  # type: ignore[attr-defined]
    report: dict[str, Any] = {
        "machine": machine_info(),
        "layout": LAYOUT,
        "quick": args.quick,
        "repeats": args.repeats,
        "bandwidth_gb_s": bandwidth_gb_s(64 if args.quick else 512),
        "decoder_weight_bytes": step_weight_bytes(decoder),
        "build": {v: [s.as_dict() for s in e.adapter.build] for v, e in engines.items()},
    }
    floor_ms = report["decoder_weight_bytes"] / (report["bandwidth_gb_s"] * 1e9) * 1000
    report["weights_read_ms"] = floor_ms
    photos = sample_images(max(args.rows))

    def run(engine: Engine, rows: int, tokens: int) -> float:
        batch = [RowInput(i, photos[i]) for i in range(rows)]
        params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
        t = time.perf_counter()
        engine.predict(batch, params)
        return time.perf_counter() - t

    for engine in engines.values():  # first calls (allocations, kernels) before the clock
        run(engine, max(args.rows), 2)
    steps: dict[str, dict[int, list[float]]] = {v: {n: [] for n in args.rows} for v in engines}
    for _ in range(args.repeats):
        for n in args.rows:
            for variant, engine in engines.items():
                one, twenty = run(engine, n, 1), run(engine, n, 20)
                steps[variant][n].append((twenty - one) / 19 * 1000)
    results = []
    base = args.variants[0]
    for variant in engines:
        for n in args.rows:
            runs = steps[variant][n]
            r = {"variant": variant, "rows": n, "step_ms": statistics.median(runs)}
            r |= {"step_ms_runs": runs, "step_over_floor": r["step_ms"] / floor_ms}
            if variant != base:
                ratios = [b / a for a, b in zip(steps[base][n], runs, strict=True)]
                r |= {"vs_first": statistics.median(ratios), "vs_first_runs": ratios}
            results.append(r)
            floor = r["step_over_floor"]
            log(f"{variant}, {n} rows: a step {r['step_ms']:.1f} ms ({floor:.1f}x the floor)")
    report["results"] = results
    for engine in engines.values():
        engine.close()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
