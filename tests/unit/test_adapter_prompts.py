"""Each family's prompting: a bare question (``blipserve ask``) and a chat (the OpenAI route).

The prompt methods belong to the adapter class, not to a loaded model: no model is built.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from blipserve.contracts.openai import parse_chat_request
from blipserve.models.base import HFAdapter
from blipserve.models.blip import BlipCaptionAdapter, BlipMatchAdapter, BlipVqaAdapter
from blipserve.models.blip2 import Blip2Adapter

BLIP_HEADS = [BlipCaptionAdapter, BlipVqaAdapter, BlipMatchAdapter]


@pytest.mark.parametrize("adapter", BLIP_HEADS)
def test_blip_heads_use_only_the_last_question(adapter: type[HFAdapter]) -> None:
    assert adapter.chat_prompt("a photo of", [("what?", "a cat")]) == "a photo of"
    assert adapter.chat_prompt(None, [("what?", "a cat")]) is None


def test_blip2_prompt_caption_and_single_question() -> None:
    assert Blip2Adapter.chat_prompt(None, []) is None
    assert Blip2Adapter.chat_prompt(None, [("what?", "a cat")]) is None
    assert Blip2Adapter.chat_prompt("what is it?", []) == "Question: what is it? Answer:"


def test_blip2_prompt_with_history() -> None:
    history = [("what is it?", "a cat"), ("what colour?", "black."), ("", "hm")]
    assert Blip2Adapter.chat_prompt("where is it?", history) == (
        "Question: what is it? Answer: a cat. Question: what colour? Answer: black. hm. "
        "Question: where is it? Answer:"
    )


def test_blip2_full_prompt_is_used_as_is() -> None:
    full = "Question: how many cats? answer:"
    assert Blip2Adapter.chat_prompt(full, []) == full
    assert Blip2Adapter.chat_prompt(full, [("what?", "cats")]) == (
        f"Question: what? Answer: cats. {full}"
    )


def test_prompt_built_from_a_parsed_request() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
    req = parse_chat_request(
        {
            "model": "blip",
            "messages": [
                {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": [{"type": "text", "text": "what colour is it?"}]},
            ],
        }
    )
    assert Blip2Adapter.chat_prompt(req.question, req.history) == (
        "Question: what is it? Answer: a cat. Question: what colour is it? Answer:"
    )
    assert BlipVqaAdapter.chat_prompt(req.question, req.history) == "what colour is it?"


@pytest.mark.parametrize(
    ("question", "adapter", "expected"),
    [
        ("what is it?", Blip2Adapter, "Question: what is it? Answer:"),
        ("Question: what is it? Answer:", Blip2Adapter, "Question: what is it? Answer:"),
        ("what is it?", BlipVqaAdapter, "what is it?"),
        ("a picture of", BlipCaptionAdapter, "a picture of"),
    ],
)
def test_question_prompt_wraps_bare_questions_for_blip2(
    question: str, adapter: type[HFAdapter], expected: str
) -> None:
    assert adapter.question_prompt(question) == expected


def test_every_entry_point_prompts_through_one_stage() -> None:
    # /score and batch jobs send the text as it is; `ask` a question in the family's
    # template; the chat route the last question after its history (engine/prompt.py)
    from blipserve.engine import prompt_of
    from blipserve.models.blip2 import Blip2Adapter

    adapter = cast(Any, Blip2Adapter)  # (the prompts are the family's, no model needed)
    assert prompt_of(adapter, "what is it?") == "what is it?"
    assert prompt_of(adapter, None, "question") is None
    assert prompt_of(adapter, "what is it?", "question") == "Question: what is it? Answer:"
    assert prompt_of(adapter, "and now?", "chat", [("what?", "a cat")]) == (
        "Question: what? Answer: a cat. Question: and now? Answer:"
    )
