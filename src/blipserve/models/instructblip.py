"""InstructBLIP (Dai et al., 2023): BLIP-2 whose Q-Former also reads the instruction.

The instruction goes to two places: the Q-Former (a BERT tokenizer, the processor's
``qformer_tokenizer``), which picks the image features that the instruction asks about, and
the language model (Vicuna, decoder-only, or Flan-T5, encoder-decoder) after the query
tokens, as in BLIP-2.  Prompts follow LAVIS's InstructBLIP evaluation configurations
(``lavis/projects/instructblip``): ``A short image caption.`` when a row has no text,
``Question: {} Short answer:`` for a bare question.  The returned text never echoes the
prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers import InstructBlipForConditionalGeneration

from blipserve.models.blip2 import ANSWER_MARK, Blip2Adapter
from blipserve.models.registry import register
from blipserve.types import ModelInput

#: the instruction of a row without text: LAVIS's captioning evaluations (COCO, NoCaps;
#: Vicuna and Flan-T5 alike) use it
CAPTION_INSTRUCTION = "A short image caption."
#: LAVIS trains and evaluates with at most this many Q-Former instruction tokens
#: (``max_txt_len``); positions past it were never trained, so a longer one is cut
QFORMER_MAX_TOKENS = 128


@register("InstructBlipForConditionalGeneration")
class InstructBlipAdapter(Blip2Adapter):
    """InstructBLIP-Vicuna and InstructBLIP-Flan-T5: captions, questions and chat.

    A row's ``text`` is the instruction as it is (``text_role`` ``prompt``); without text
    the model captions (:data:`CAPTION_INSTRUCTION`).  ``blipserve ask`` and the OpenAI
    route make their prompts with :meth:`question_prompt` and :meth:`chat_prompt`.

    >>> InstructBlipAdapter.question_prompt("what is on the table?")
    'Question: what is on the table? Short answer:'
    """

    model_class = InstructBlipForConditionalGeneration
    kind = "instructblip"
    # Loading, speed options (HFAdapter's: int8 Linear layers on a CPU), the int8 vision
    # recipe, the language model's prompt (padding side, room for new tokens) and decoding
    # are BLIP-2's: InstructBLIP's vision encoder and language models are the same.

    @classmethod
    def question_prompt(cls, question: str) -> str:
        """``Question: {q} Short answer:``, unless the text already holds ``answer:`` (any
        case): then it is taken to be a full prompt and used as it is."""
        if ANSWER_MARK.search(question):
            return question
        return f"Question: {question} Short answer:"

    @classmethod
    def chat_prompt(cls, question: str | None, history: Sequence[tuple[str, str]]) -> str | None:
        """A first question is the instruction as it is: InstructBLIP was tuned on plain
        instructions and answers them at the length they ask for, as chat clients expect
        (the model cards prompt it so).  After a history, BLIP-2's transcript
        (``Question: {q} Answer: {a}.`` per turn) ending in :meth:`question_prompt`;
        ``None`` when there is no question (a caption)."""
        if question is None or history:
            return super().chat_prompt(question, history)
        return question

    def model_row(self, item: ModelInput) -> ModelInput:
        """``item`` with its instruction: the caption instruction when it has no text."""
        if item.text:
            return item
        return dataclasses.replace(item, text=CAPTION_INSTRUCTION)

    def check_row(self, item: ModelInput) -> None:
        super().check_row(self.model_row(item))

    def count_tokens(self, text: str | None) -> int:
        # A caption's prompt is the caption instruction, which the model reads too.
        return super().count_tokens(text or CAPTION_INSTRUCTION)

    def extra_inputs(self, items: Sequence[ModelInput]) -> dict[str, torch.Tensor]:
        """The Q-Former's input: each row's instruction, padded on the right (its positions
        start at the first token; padding is masked), cut to its first
        :data:`QFORMER_MAX_TOKENS` tokens as LAVIS does."""
        qformer = self.model.config.qformer_config
        encoded = self.processor.qformer_tokenizer(
            [item.text for item in items],
            padding=True,
            truncation=True,
            max_length=min(QFORMER_MAX_TOKENS, qformer.max_position_embeddings),
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {
            "qformer_input_ids": encoded["input_ids"].to(self.device),  # (B, T)
            "qformer_attention_mask": encoded["attention_mask"].to(self.device),  # (B, T)
        }
