"""BLIP's text decoder on OpenVINO against blipserve's torch int8 decoder, side by side.

Not (yet) a blipserve feature: this measures whether it should be one.  The decoder of a
full-size random-weight BLIP-base (tests/data/hf-layouts) is converted into two OpenVINO
models traced from transformers' own ``BlipTextLMHeadModel``:

* **cross**: image features (B, 577, 768) -> each layer's cross-attention keys and values
  (computed once per caption, as transformers' cache does);
* **step**: token ids, attention mask, the self-attention cache so far (B, 12, P, 64) per
  layer and the cross keys/values -> logits and the new tokens' keys/values (P may be 0).

A stand-in ``forward`` on the decoder feeds them from transformers' ``EncoderDecoderCache``,
so ``generate`` (greedy, beams, sampling, every processor) is unchanged.  Checked here:
in float32 the OpenVINO decoder's tokens equal transformers' own, greedy and with 3 beams.

Modes: ``torch-int8`` (blipserve's int8 decoder, as ``--dtype int8`` loads it),
``ov-f32``, ``ov-int8`` (NNCF int8 weights, activations quantized per token at run time,
the rest in float32).  ms per image for 20 tokens (``min_new_tokens = max_new_tokens``) at
batch 1 and 8, passes interleaved, medians.

    .venv/bin/python bench/openvino_decoder.py --out bench/results/openvino-decoder.json
    .venv/bin/python bench/openvino_decoder.py --quick --repeats 1 --tokens 4   # tiny model

``--steps``: instead, one decoding step alone (one row, 10 tokens already cached, no
``generate`` around it), the OpenVINO step model's ``infer`` with each weight compression
and precision setting against blipserve's int8 decoder's forward -- whether keeping the
cache inside OpenVINO (a stateful model) could pay: its inputs are shared, not copied, so
what is left is the step's own time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testkit/, shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from openvino_decoder_convert import convert, on_openvino

LAYOUT = "blip-image-captioning-base"


def torch_int8(model: nn.Module, processor: Any) -> Any:
    """A copy of the float32 ``model`` in int8 as ``--dtype int8 --backend torch`` loads it:
    blipserve's ``build_model``."""
    from blipserve.config import ModelConfig
    from blipserve.models import build_model

    spec = ModelConfig(model=LAYOUT, device="cpu", dtype="int8", backend="torch")
    return build_model(spec, pretrained=(copy.deepcopy(model), processor)).model


def generate(decoder: nn.Module, rows: int, tokens: int, beams: int = 1) -> torch.Tensor:
    width = cast(Any, decoder).config.encoder_hidden_size  # the vision encoder's: 768
    image = torch.randn(rows, 577, width, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[30522, 1037, 3861, 1997]] * rows)  # [DEC] a picture of
    with torch.inference_mode():
        return cast(
            torch.Tensor,
            cast(Any, decoder).generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(rows, 577, dtype=torch.long),
                eos_token_id=102,
                pad_token_id=0,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                num_beams=beams,
            ),
        )


def step_times(model: nn.Module, processor: Any, repeats: int) -> dict[str, list[float]]:
    """ms per decoding step (one row, 10 tokens cached) per variant, passes interleaved."""
    import nncf
    import openvino as ov

    decoder: Any = model.text_decoder
    _, step = convert(decoder, decoder.config)
    config = decoder.config  # BLIP-base's: 12 layers of 12 heads of 64, images of 768
    n, heads, seen = config.num_hidden_layers, config.num_attention_heads, 10
    head_dim, width = config.hidden_size // heads, config.encoder_hidden_size

    def compiled(m: Any, dynamic: int, precision: str = "f32") -> Any:
        settings = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(dynamic),
        }
        return ov.Core().compile_model(m, "CPU", settings).create_infer_request()

    mode = nncf.CompressWeightsMode
    int8 = nncf.compress_weights(step.clone(), mode=mode.INT8_ASYM)
    # groups of 128 inputs (--quick's layers are 64 wide: one group each)
    group = min(128, config.hidden_size)
    int4 = nncf.compress_weights(step.clone(), mode=mode.INT4_SYM, group_size=group, ratio=1.0)
    requests = {
        "ov-f32": compiled(step, 0),
        "ov-int8-weights": compiled(int8, 0),
        "ov-int8-dynamic": compiled(int8, 32),
        "ov-int8-weights-bf16": compiled(int8, 0, "bf16"),
        "ov-int4-dynamic": compiled(int4, 32),
    }
    rng = np.random.default_rng(0)
    inputs: list[np.ndarray[Any, Any]] = [
        np.zeros((1, 1), np.int64),
        np.ones((1, seen + 1), np.int64),
    ]
    inputs += [np.ones((1, 577), np.int64)]
    inputs += [rng.standard_normal((1, heads, seen, head_dim), np.float32) for _ in range(2 * n)]
    inputs += [rng.standard_normal((1, heads, 577, head_dim), np.float32) for _ in range(2 * n)]
    ours: Any = torch_int8(model, processor).text_decoder
    image = torch.randn(1, 577, width)
    image_mask = torch.ones(1, 577, dtype=torch.long)
    times: dict[str, list[float]] = {k: [] for k in [*requests, "torch-int8"]}
    with torch.inference_mode():
        first = ours(
            input_ids=torch.tensor([[30522] + [1037] * seen]),
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            use_cache=True,
            return_dict=True,
        )
        for _ in range(repeats):
            for name, request in requests.items():
                request.infer(inputs, share_inputs=True)
                started = time.perf_counter()
                for _ in range(20):
                    request.infer(inputs, share_inputs=True)
                times[name].append((time.perf_counter() - started) / 20 * 1e3)
            cache = copy.deepcopy(first.cache)
            started = time.perf_counter()
            for i in range(20):  # 20 steps on from the same 11-token cache
                ours(
                    input_ids=torch.tensor([[1037]]),
                    attention_mask=torch.ones(1, seen + 2 + i, dtype=torch.long),
                    encoder_hidden_states=image,
                    encoder_attention_mask=image_mask,
                    cache=cache,
                    use_cache=True,
                    return_dict=True,
                )
            times["torch-int8"].append((time.perf_counter() - started) / 20 * 1e3)
    return times


def main() -> None:
    from common import machine_info
    from speed_models import build

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--steps", action="store_true", help="one decoding step alone")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny model of the same layout")
    args = parser.parse_args()

    model, processor = build(LAYOUT, args.quick, torch.device("cpu"))
    if args.steps:
        steps = step_times(model, processor, args.repeats)
        step_medians = {k: statistics.median(v) for k, v in steps.items()}
        for name, ms in step_medians.items():
            print(f"{name:22} {ms:5.2f} ms per step (one row, 10 tokens cached)")
        if args.out:
            report = {
                "machine": machine_info(),
                "command": " ".join(sys.argv),
                "ms_per_step": steps,
                "median_ms_per_step": step_medians,
            }
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        return
    reference = model.text_decoder
    cross, step = convert(reference, reference.config)
    modes = {
        "torch-int8": torch_int8(model, processor).text_decoder,
        "ov-f32": on_openvino(reference, cross, step, int8=False),
        "ov-int8": on_openvino(reference, cross, step, int8=True),
    }
    checks = {
        "ov-f32 greedy tokens == transformers float32": all(
            torch.equal(
                generate(modes["ov-f32"], b, args.tokens), generate(reference, b, args.tokens)
            )
            for b in (1, 8)
        ),
        "ov-f32 3 beams tokens == transformers float32": torch.equal(
            generate(modes["ov-f32"], 2, args.tokens, beams=3),
            generate(reference, 2, args.tokens, beams=3),
        ),
    }
    print(checks, file=sys.stderr)
    times: dict[str, dict[str, list[float]]] = {m: {"1": [], "8": []} for m in modes}
    for rep in range(args.repeats):
        for mode, decoder in modes.items():
            for rows in (1, 8):
                started = time.perf_counter()
                generate(decoder, rows, args.tokens)
                times[mode][str(rows)].append((time.perf_counter() - started) / rows * 1e3)
        print(f"pass {rep + 1} done", file=sys.stderr)
    medians = {m: {b: statistics.median(v) for b, v in t.items()} for m, t in times.items()}
    for mode, m in medians.items():
        print(
            f"{mode:12} batch 1 {m['1']:5.0f} ms  batch 8 {m['8']:5.0f} ms"
            f" per image ({args.tokens} tokens)"
        )
    if args.out:
        report = {
            "machine": machine_info(),
            "command": " ".join(sys.argv),
            "checks": checks,
            "ms_per_image": times,
            "median_ms_per_image": medians,
        }
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
