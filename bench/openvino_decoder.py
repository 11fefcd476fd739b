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
import types
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # testkit/, shared with the tests
sys.path.insert(0, str(ROOT / "bench"))


def filled(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache holding ``pairs`` as they are (its own constructor would concatenate
    them onto a rank-1 empty tensor, which OpenVINO's converter cannot follow)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.keys, layer.values, layer.device = keys, values, keys.device
        layer.is_initialized = True
        cache.layers.append(layer)
    return cache


class Cross(nn.Module):
    def __init__(self, decoder: nn.Module, layers: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.decoder, self.shape = decoder, (layers, heads, head_dim)

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import EncoderDecoderCache

        layers, heads, head_dim = self.shape
        rows = image.shape[0]

        def empty() -> Any:
            return filled([(image.new_zeros(rows, heads, 0, head_dim),) * 2] * layers)

        out = self.decoder(
            input_ids=torch.zeros(rows, 1, dtype=torch.long),
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            cache=EncoderDecoderCache(empty(), empty()),
            use_cache=True,
            return_dict=True,
        )
        return tuple(
            t for lay in out.cache.cross_attention_cache.layers for t in (lay.keys, lay.values)
        )


class Step(nn.Module):
    def __init__(self, decoder: nn.Module, layers: int) -> None:
        super().__init__()
        self.decoder, self.layers = decoder, layers

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, image_mask: torch.Tensor, *kv: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import EncoderDecoderCache

        n = self.layers
        past = filled([(kv[2 * i], kv[2 * i + 1]) for i in range(n)])
        cross = filled([(kv[2 * n + 2 * i], kv[2 * n + 2 * i + 1]) for i in range(n)])
        seen = kv[0].shape[2]
        out = self.decoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=kv[2 * n].transpose(1, 2).flatten(2),  # (only its shape is read)
            encoder_attention_mask=image_mask,
            cache=EncoderDecoderCache(past, cross),
            use_cache=True,
            return_dict=True,
        )
        new = out.cache.self_attention_cache.layers
        return (out.logits, *(t[:, :, seen:] for lay in new for t in (lay.keys, lay.values)))


def convert(decoder: nn.Module, config: Any) -> tuple[Any, Any]:
    import openvino as ov

    n, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim, width = config.hidden_size // heads, config.hidden_size
    rows, image_tokens, seen = 2, 577, 3
    image = torch.randn(rows, image_tokens, width)
    mask = torch.ones(rows, image_tokens, dtype=torch.long)
    with torch.no_grad():
        cross = ov.convert_model(
            Cross(decoder, n, heads, head_dim),
            example_input=(image, mask),
            input=[ov.PartialShape([-1, -1, width]), ov.PartialShape([-1, -1])],
        )
        example = [
            torch.zeros(rows, 1, dtype=torch.long),
            torch.ones(rows, seen + 1, dtype=torch.long),
            mask,
        ]
        example += [torch.randn(rows, heads, seen, head_dim) for _ in range(2 * n)]
        example += [torch.randn(rows, heads, image_tokens, head_dim) for _ in range(2 * n)]
        shapes = [[-1, -1]] * 3 + [[-1, heads, -1, head_dim]] * (4 * n)
        step = ov.convert_model(
            Step(decoder, n),
            example_input=tuple(example),
            input=[ov.PartialShape(s) for s in shapes],
        )
    return cross, step


def on_openvino(decoder: nn.Module, cross: Any, step: Any, int8: bool) -> nn.Module:
    """A copy of ``decoder`` whose forward runs the two OpenVINO models."""
    import nncf
    import openvino as ov
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    if int8:
        cross = nncf.compress_weights(cross.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
        step = nncf.compress_weights(step.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
    settings = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": "32" if int8 else "0",
    }
    core = ov.Core()
    cross_request = core.compile_model(cross, "CPU", settings).create_infer_request()
    step_request = core.compile_model(step, "CPU", settings).create_infer_request()
    config: Any = decoder.config  # (a transformers config: attributes by model type)
    n, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads

    def forward(
        self: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: Any = None,
        encoder_hidden_states: Any = None,
        encoder_attention_mask: Any = None,
        cache: Any = None,
        past_key_values: Any = None,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> Any:
        cache = cache if cache is not None else past_key_values
        cache = cache if cache is not None else DynamicCache()
        if not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache, DynamicCache())
        rows, new = input_ids.shape
        image_mask = encoder_attention_mask
        if image_mask is None:
            image_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.long)
        crossed = cache.cross_attention_cache
        if crossed.get_seq_length() == 0:  # first step: the image's keys and values
            cross_request.infer(
                [encoder_hidden_states.float().contiguous().numpy(), image_mask.numpy()],
                share_inputs=True,
            )
            for i in range(n):
                keys, values = (
                    torch.from_numpy(cross_request.get_output_tensor(2 * i + j).data.copy())
                    for j in (0, 1)
                )
                crossed.update(keys, values, i)
                cache.is_updated[i] = True
        own = cache.self_attention_cache
        seen = own.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(rows, seen + new, dtype=torch.long)
        if seen == 0:
            past = [np.zeros((rows, heads, 0, head_dim), np.float32)] * (2 * n)
        else:
            past = [t.numpy() for lay in own.layers for t in (lay.keys, lay.values)]
        image_kv = [t.numpy() for lay in crossed.layers for t in (lay.keys, lay.values)]
        step_request.infer(
            [input_ids.numpy(), attention_mask.numpy(), image_mask.numpy(), *past, *image_kv],
            share_inputs=True,
        )
        logits = torch.from_numpy(step_request.get_output_tensor(0).data.copy())
        for i in range(n):
            keys, values = (
                torch.from_numpy(step_request.get_output_tensor(1 + 2 * i + j).data.copy())
                for j in (0, 1)
            )
            own.update(keys, values, i)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithCrossAttentions(logits=logits, cache=cache)

    copied = copy.deepcopy(decoder)
    copied.forward = types.MethodType(forward, copied)
    return copied


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


def step_times(model: nn.Module, repeats: int) -> dict[str, list[float]]:
    """ms per decoding step (one row, 10 tokens cached) per variant, passes interleaved."""
    import nncf
    import openvino as ov

    from blipserve.models import optimize
    from blipserve.models.blip import BlipCaptionAdapter
    from blipserve.models.precision import resolve_precision

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
    int4 = nncf.compress_weights(step.clone(), mode=mode.INT4_SYM, group_size=128, ratio=1.0)
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
    int8_model = copy.deepcopy(model)
    cpu = torch.device("cpu")
    speedups = BlipCaptionAdapter.speedups(resolve_precision("int8", cpu), cpu)
    optimize.prepare(int8_model, speedups)
    ours: Any = int8_model.text_decoder
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

    from blipserve.models import optimize
    from blipserve.models.blip import BlipCaptionAdapter
    from blipserve.models.precision import resolve_precision

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--steps", action="store_true", help="one decoding step alone")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny model of the same layout")
    args = parser.parse_args()

    model, _ = build("blip-image-captioning-base", args.quick, torch.device("cpu"))
    if args.steps:
        steps = step_times(model, args.repeats)
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
    int8_model = copy.deepcopy(model)
    cpu = torch.device("cpu")
    speedups = BlipCaptionAdapter.speedups(resolve_precision("int8", cpu), cpu)
    optimize.prepare(int8_model, speedups)
    modes = {
        "torch-int8": int8_model.text_decoder,
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
