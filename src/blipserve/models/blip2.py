"""BLIP-2 (Li et al., 2023): a frozen image encoder and LLM bridged by a Q-Former.

Captioning (no text) and prompted generation (``Question: ... Answer:``), with OPT
(decoder-only) or Flan-T5 (encoder-decoder) language models.  The returned text never
echoes the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from transformers import Blip2ForConditionalGeneration

from blipserve.models.base import GenerateInputs, HFAdapter
from blipserve.models.registry import register
from blipserve.models.static_cache import cache_length
from blipserve.params import GenerationParams
from blipserve.types import ModelInput


@register("Blip2ForConditionalGeneration")
class Blip2Adapter(HFAdapter):
    model_class = Blip2ForConditionalGeneration
    kind = "blip2"
    # --backend openvino --dtype int8: int8 weights with activations quantized per token at
    # run time (demo-vqa's captions and answers as float32's for 99.25% of 400 held-out
    # rows); static int8 reached only 97.5-98.5% in every variant tried (both presets;
    # SmoothQuant at 0.3, 0.5, 0.7; calibration on the demo scenes themselves; the MLP alone
    # in int8).  --backend auto keeps torch's int8 encoder: on ViT-g (real width, two
    # layers) dynamic int8 took 44 / 35 ms per image at batch 1 / 8 against torch's 39 / 38
    # (bench/results/openvino-encoder-blip2.json).
    vision_int8 = "int8-dynamic"
    openvino_when_auto = False
    # Speed options: HFAdapter.speedups' (BLIP's lean text layers and vision attention have
    # no counterpart in BLIP-2's modules).
    text_role = "prompt"

    @classmethod
    def question_prompt(cls, question: str) -> str:
        """``Question: {q} Answer:``, unless the text already holds ``Answer:`` (any case):
        then it is taken to be a full BLIP-2 prompt and used as it is."""
        if ANSWER_MARK.search(question):
            return question
        return f"Question: {question} Answer:"

    @classmethod
    def chat_prompt(cls, question: str | None, history: Sequence[tuple[str, str]]) -> str | None:
        """``None`` when there is no question (a plain caption; the history alone asks
        nothing).  Otherwise each history turn becomes ``Question: {q} Answer: {a}.`` (just
        ``{a}.`` when the turn had no text, e.g. it only sent the image; no second period
        when the answer already ends in ``.``, ``!`` or ``?``), joined by spaces, followed
        by :meth:`question_prompt` of the question."""
        if question is None:
            return None
        turns = [_history_turn(q, a) for q, a in history]
        turns.append(cls.question_prompt(question))
        return " ".join(turns)

    @property
    def decoder_only(self) -> bool:
        return bool(self.model.config.use_decoder_only_language_model)

    def check_row(self, item: ModelInput) -> None:
        if self.decoder_only:
            text_ids = self.tokenizer(item.text or "")["input_ids"]  # as encode_prompts does
            prompt = self.model.config.num_query_tokens + len(text_ids)
            self.check_room(prompt, item.params)
        self.check_params(item.params)

    def batch_key(self, item: ModelInput) -> Hashable:
        # Prompts of any length share a batch: padding is masked (left padding for
        # decoder-only LMs, whose OPT positions follow the attention mask).
        return (item.params,)

    def position_limit(self) -> int | None:
        # OPT learns its positions; T5's are relative, with no limit.
        if not self.decoder_only:
            return None
        return int(self.model.config.text_config.max_position_embeddings)

    def encode_prompts(self, items: Sequence[ModelInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[<image>] * num_query_tokens + tokenizer(prompt)``, padded to one length.

        The Q-Former outputs replace the ``<image>`` embeddings inside ``generate``.  We
        tokenize here rather than with the processor so that padding goes *before* the
        image tokens for decoder-only models (the processor would put it between them and
        the text).  An empty prompt tokenizes to OPT's BOS / T5's EOS, which is what
        ``generate`` uses for a plain caption.
        """
        config = self.model.config
        image_ids = [config.image_token_index] * config.num_query_tokens
        rows = [image_ids + self.tokenizer(item.text or "")["input_ids"] for item in items]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if self.decoder_only else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)  # (B, Q + T) each

    @classmethod
    def static_cache_refusal(cls, config: Any) -> str | None:
        if config.use_decoder_only_language_model:
            return None
        return super().static_cache_refusal(config)

    def extra_inputs(self, items: Sequence[ModelInput]) -> dict[str, torch.Tensor]:
        """Model inputs beyond the pixels and the prompt (a family's own, e.g. InstructBLIP's
        Q-Former instruction)."""
        return {}

    def model_inputs(self, items: Sequence[ModelInput]) -> GenerateInputs:
        pixel_values = self.pixel_values(items)  # (B, 3, S, S)
        input_ids, attention_mask = self.encode_prompts(items)
        tensors = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **self.extra_inputs(items),
        }
        if self.decoder_only:
            # Decoder-only generate returns prompt + continuation; keep the continuation.
            return GenerateInputs(tensors, prompt_columns=input_ids.shape[1])
        return GenerateInputs(tensors, new_from=1)  # after T5's decoder start token

    def static_cache_inputs(
        self, inputs: GenerateInputs, params: GenerationParams
    ) -> dict[str, Any]:
        # (transformers keeps the longest length seen so far: warm-up's should hold)
        new = params.max_new_tokens or self.default_max_new_tokens
        positions = cache_length(inputs.tensors["input_ids"].shape[1], new)
        return {"cache_implementation": "static", "max_cache_len": positions}


#: a text that holds "Answer:" is a full prompt already, used as it is
ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)


def _history_turn(question: str, answer: str) -> str:
    end = "" if answer.endswith((".", "!", "?")) else "."
    if not question:
        return f"{answer}{end}"
    return f"Question: {question} Answer: {answer}{end}"
