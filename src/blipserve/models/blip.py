"""BLIP (Li et al., 2022): captioning, visual question answering, image-text matching."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

from blipserve.errors import InvalidInput
from blipserve.models.base import HFAdapter
from blipserve.models.registry import register
from blipserve.types import ModelInput, Prediction


class _BlipText(HFAdapter):
    """BLIP adapters whose text goes through the BERT tokenizer unchanged in length.

    Rows are grouped by token length as well as by parameters: BLIP's ``generate`` drops
    the last input column assuming it is ``[SEP]`` (right padding would leave a ``[SEP]``
    inside shorter prompts), and its VQA decoder attends to question padding (the mask it
    builds is all ones).  Equal lengths need no padding, so batched == one-by-one.
    """

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

    def prompt_positions(self, text_tokens: int) -> int:
        """Positions the text decoder's prompt takes, given the row's text length in tokens."""
        return 1  # [BOS] / [DEC]

    def batch_key(self, item: ModelInput) -> Hashable:
        n = self.token_length(item.text)
        self.check_room(self.prompt_positions(n), item.params)
        return (item.params, n)

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

    def prompt_positions(self, text_tokens: int) -> int:
        return max(1, text_tokens - 1)  # the prefix is the prompt; generate drops its [SEP]

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        kwargs = self.generate_kwargs(items[0].params)
        if items[0].text is None:
            out = self.model.generate(pixel_values=pixel_values, **kwargs)
            prompt_len = 1  # [DEC]
        else:
            text = self.encode_text(items)
            out = self.model.generate(pixel_values=pixel_values, **text, **kwargs)
            prompt_len = text["input_ids"].shape[1] - 1  # generate drops the final [SEP]
        return self.decode(out, new_from=prompt_len)


@register("BlipForQuestionAnswering")
class BlipVqaAdapter(_BlipText):
    """Answers the question in a row's text."""

    model_class = BlipForQuestionAnswering
    kind = "blip-vqa"
    text_role = "question"
    text_required = True

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        kwargs = self.generate_kwargs(items[0].params)
        out = self.model.generate(pixel_values=pixel_values, **self.encode_text(items), **kwargs)
        return self.decode(out, new_from=1)  # the answer starts after [BOS]


@register("BlipForImageTextRetrieval")
class BlipMatchAdapter(_BlipText):
    """Probability that a row's text describes its image (the ITM head)."""

    model_class = BlipForImageTextRetrieval
    kind = "blip-itm"
    text_role = "match"
    text_required = True

    def batch_key(self, item: ModelInput) -> Hashable:
        # The text encoder masks padding, and generation settings do not apply; the text
        # must still fit its positions.
        self.token_length(item.text)
        return ()

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        out = self.model(pixel_values=pixel_values, **self.encode_text(items), use_itm_head=True)
        probs = out.itm_score.float().softmax(dim=-1)[:, 1]  # (B,) P(match)
        return [Prediction(f"{p:.4f}", score=round(float(p), 6)) for p in probs.tolist()]
