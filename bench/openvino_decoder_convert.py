"""bench/openvino_decoder.py's conversion: BLIP's text decoder traced into two OpenVINO
models (**cross**: the image's cross-attention keys and values; **step**: one decoding step
on the cache so far), and a copy of the decoder whose ``forward`` runs them, fed from
transformers' ``EncoderDecoderCache`` so that ``generate`` is unchanged."""

from __future__ import annotations

import copy
import types
from typing import Any

import numpy as np
import torch
from torch import nn


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
