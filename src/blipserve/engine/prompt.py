"""Stage 0: the text a row gives the model, made here for every entry point.

A client's text comes in one of three forms (:data:`PromptForm`), and the model's adapter
(its family) turns it into what the model reads:

* ``text`` — as sent, the row's own text: a BLIP caption prefix, a VQA question, a BLIP-2
  prompt, the caption an ITM model scores (``/score``, ``/v2/.../infer``, batch jobs,
  ``blipserve caption --prompt``, MLflow); a family may still fill in its default when
  there is none (InstructBLIP's caption instruction, in ``model_row``);
* ``question`` — a bare question, put in the family's question template (``blipserve
  ask``: BLIP-2's ``Question: ... Answer:``);
* ``chat`` — a conversation's last question after its (question, answer) history (the
  OpenAI-compatible route), as the family chats (BLIP-2: earlier turns in its template).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from blipserve.models.protocol import Adapter

PromptForm = Literal["text", "question", "chat"]


def prompt_of(
    adapter: Adapter,
    text: str | None,
    form: PromptForm = "text",
    history: Sequence[tuple[str, str]] = (),
) -> str | None:
    """The text ``adapter``'s model reads for a client's ``text`` in ``form`` (``None``: no
    text, a plain caption)."""
    if form == "chat":
        return adapter.chat_prompt(text, history)
    if form == "question" and text is not None:
        return adapter.question_prompt(text)
    return text
