"""BLIP (Li et al., 2022): captioning, visual question answering, image-text matching."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

from blipserve.errors import InvalidInput
from blipserve.models import optimize
from blipserve.models.base import GenerateInputs, HFAdapter
from blipserve.models.matching import one_score_per_row
from blipserve.models.optimize import Speedup
from blipserve.models.precision import Precision, amx_bf16, cpu_has_native_bf16
from blipserve.models.registry import register
from blipserve.models.static_cache import blip_text_cache, cache_length
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction


def _vision_attention(precision: Precision, device: torch.device) -> str:
    """How BLIP's vision attention runs (:mod:`blipserve.models.vision_encoder`), as measured.

    SDPA for float32 on a CPU, where BLIP-base's vision encoder ran 20% faster with it
    (median 297 vs 370 ms per image, six interleaved runs), while in bfloat16 torch's CPU
    kernel was slower than the eager code at batch 8 (1.79 vs 1.92 images/s, medians of
    three passes).  In int8 mode, on a CPU with native bf16, its products in bfloat16
    instead (batch 8: 2.39 vs 2.29 images/s with float32 SDPA, medians of three
    interleaved passes of ``bench/speed.py``; the demo model's captions stay those of
    float32).  On a GPU, SDPA in every dtype: the eager code writes and reads a (B, 12,
    577, 577) score tensor per layer, which SDPA's fused kernels (flash attention in
    bfloat16 and float16) never hold; the speed-up there is not measured yet (issue 22:
    ``scripts/device_check.sh``).
    """
    if device.type == "cuda":
        return "sdpa"
    if device.type != "cpu" or precision.dtype != torch.float32:
        return "eager"
    return "bf16" if precision.int8 and cpu_has_native_bf16() else "sdpa"


class _BlipText(HFAdapter):
    """BLIP adapters whose text goes through the BERT tokenizer unchanged in length.

    Rows are grouped by token length as well as by parameters: BLIP's ``generate`` drops
    the last input column assuming it is ``[SEP]`` (right padding would leave a ``[SEP]``
    inside shorter prompts), and its VQA decoder attends to question padding (the mask it
    builds is all ones).  Equal lengths need no padding, so batched == one-by-one.
    """

    vision_attentions = True

    @classmethod
    def speedups(
        cls, precision: Precision, device: torch.device, attention: str = "auto"
    ) -> list[Speedup]:
        """On a CPU, lean text layers; the vision attention :func:`_vision_attention` picks
        (or ``attention``, ``--vision-attention``); in int8 every Linear, the image's keys
        and values one image per call."""
        steps = []
        if device.type == "cpu":
            steps += [optimize.KEEP_FREED_MEMORY, optimize.LEAN_TEXT_LAYERS]
        if attention == "auto":
            attention = _vision_attention(precision, device)
        if attention != "eager":
            steps.append(optimize.vision_attention(attention))
        if precision.int8:
            amx = amx_bf16(device)  # (AMX's bf16 tiles, where oneDNN runs bf16 natively)
            steps += optimize.int8_layers(precision, image_keys_values=True, amx=amx)
            if device.type == "cpu" and cpu_has_native_bf16():
                steps.append(optimize.BF16_IMAGE_KEYS_VALUES)
        return steps

    def token_length(self, text: str | None) -> int:
        if text is None:
            return 0
        n = len(self.tokenizer(text)["input_ids"])
        limit = self.model.config.text_config.max_position_embeddings
        if n > limit:
            raise InvalidInput(f"'text' is {n} tokens long; this model accepts at most {limit}")
        return n

    def position_limit(self) -> int | None:
        return int(self.model.config.text_config.max_position_embeddings)

    def end_token_ids(self) -> list[int]:
        return [int(self.model.config.text_config.sep_token_id)]  # as BLIP's generate has it

    def prompt_positions(self, text_tokens: int) -> int:
        """Positions the text decoder's prompt takes, given the row's text length in tokens."""
        return 1  # [BOS] / [DEC]

    def check_row(self, item: ModelInput) -> None:
        n = self.token_length(item.text)
        self.check_room(self.prompt_positions(n), item.params)
        self.check_params(item.params)

    def batch_key(self, item: ModelInput) -> Hashable:
        return (item.params, self.token_length(item.text))

    def encode_text(self, items: Sequence[ModelInput]) -> dict[str, torch.Tensor]:
        texts = [item.text or "" for item in items]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"].to(self.device),  # (B, T)
            "attention_mask": enc["attention_mask"].to(self.device),  # (B, T)
        }


@register("BlipForConditionalGeneration")
class BlipCaptionAdapter(_BlipText):
    """Captions; a row's text is a prefix that the caption continues (and includes)."""

    model_class = BlipForConditionalGeneration
    kind = "blip-caption"
    text_role = "prefix"
    echoes_prompt = True  # the caption includes its prefix

    def prompt_positions(self, text_tokens: int) -> int:
        return max(1, text_tokens - 1)  # the prefix is the prompt; generate drops its [SEP]

    @classmethod
    def static_cache_refusal(cls, config: Any) -> str | None:
        return None

    def model_inputs(self, items: Sequence[ModelInput]) -> GenerateInputs:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        text = {} if items[0].text is None else self.encode_text(items)
        # generate's prompt: [DEC], or the prefix without its final [SEP], which it drops;
        # the caption includes the prefix, so its new tokens start after it
        prompt_len = text["input_ids"].shape[1] - 1 if text else 1
        return GenerateInputs({"pixel_values": pixel_values, **text}, new_from=prompt_len)

    def static_cache_inputs(
        self, inputs: GenerateInputs, params: GenerationParams
    ) -> dict[str, Any]:
        """``generate``'s static cache for ``--cuda-graphs`` (:func:`blip_text_cache`): the
        prompt and new tokens rounded up (:func:`cache_length`), and the image's tokens
        (from the pixels' size: a processor may resize to another size than the config's)."""
        new = params.max_new_tokens or self.default_max_new_tokens
        patch = self.model.config.vision_config.patch_size
        height, width = inputs.tensors["pixel_values"].shape[-2:]
        image_tokens = (height // patch) * (width // patch) + 1  # patches + [CLS]
        cache = blip_text_cache(
            self.model.config.text_config, cache_length(inputs.new_from, new), image_tokens
        )
        return {"cache": cache}


@register("BlipForQuestionAnswering")
class BlipVqaAdapter(_BlipText):
    """Answers the question in a row's text."""

    model_class = BlipForQuestionAnswering
    kind = "blip-vqa"
    text_role = "question"
    text_required = True

    def model_inputs(self, items: Sequence[ModelInput]) -> GenerateInputs:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        tensors = {"pixel_values": pixel_values, **self.encode_text(items)}
        return GenerateInputs(tensors, new_from=1)  # the answer starts after [BOS]


@register("BlipForImageTextRetrieval")
class BlipMatchAdapter(_BlipText):
    """Probability that a row's text describes its image (the ITM head)."""

    model_class = BlipForImageTextRetrieval
    kind = "blip-itm"
    text_role = "match"
    text_required = True

    def check_row(self, item: ModelInput) -> None:
        # Generation settings do not apply; the text must still fit its positions.
        self.token_length(item.text)
        self.check_params(item.params)

    def batch_key(self, item: ModelInput) -> Hashable:
        return ()  # the text encoder masks padding

    def check_params(self, params: GenerationParams) -> None:
        one_score_per_row(params)

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        out = self.model(pixel_values=pixel_values, **self.encode_text(items), use_itm_head=True)
        probs = out.itm_score.float().softmax(dim=-1)[:, 1]  # (B,) P(match)
        return [Prediction(f"{p:.4f}", score=round(float(p), 6)) for p in probs.tolist()]
