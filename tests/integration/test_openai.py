"""The official `openai` client, unchanged, against the server's /v1 routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from helpers import b64_png
from testkit.live_server import RunningServer


def image_part(seed: int = 0) -> Any:  # a content part, as the client types it
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64_png(seed)}"}}


def test_models(openai_client: openai.OpenAI, tiny_model_dir: dict[str, Path]) -> None:
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [str(tiny_model_dir["blip2-opt"])]


def test_caption_and_question(openai_client: openai.OpenAI) -> None:
    caption = openai_client.chat.completions.create(
        model="blip2",
        max_tokens=5,
        messages=[{"role": "user", "content": [image_part()]}],
    )
    assert caption.object == "chat.completion"
    choice = caption.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert caption.usage is not None
    assert caption.usage.completion_tokens <= 5
    assert caption.usage.total_tokens == (
        caption.usage.prompt_tokens + caption.usage.completion_tokens
    )

    answer = openai_client.chat.completions.create(
        model="blip2",
        max_tokens=3,
        temperature=0,
        messages=[
            {"role": "user", "content": [image_part(), {"type": "text", "text": "what is it?"}]}
        ],
    )
    assert answer.usage is not None
    # "Question: what is it? Answer:" was sent to the model, not echoed back
    assert answer.usage.prompt_tokens >= 7
    assert "Question:" not in (answer.choices[0].message.content or "")


def test_length_finish_reason(openai_client: openai.OpenAI) -> None:
    out = openai_client.chat.completions.create(
        model="blip2",
        max_tokens=2,
        messages=[{"role": "user", "content": [image_part(3)]}],
        extra_body={"min_tokens": 2},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.completion_tokens == 2


def test_n_answers_are_n_choices(openai_client: openai.OpenAI) -> None:
    # min_tokens == max_tokens: each answer is exactly 2 tokens, and usage counts all of them
    out = openai_client.chat.completions.create(
        model="blip2",
        n=3,
        max_tokens=2,
        messages=[{"role": "user", "content": [image_part(4)]}],
        extra_body={"min_tokens": 2},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert all(isinstance(c.message.content, str) for c in out.choices)
    assert out.usage is not None
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6


def test_n_best_beams_first(openai_client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": [image_part(5)]}]
    beams = openai_client.chat.completions.create(
        model="blip2", n=3, max_tokens=4, messages=messages, extra_body={"num_beams": 3}
    )
    answers = [c.message.content for c in beams.choices]
    assert len(set(answers)) == 3
    best = openai_client.chat.completions.create(
        model="blip2", max_tokens=4, messages=messages, extra_body={"num_beams": 3}
    )
    assert [c.message.content for c in best.choices] == answers[:1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 17}, "n: Input should be less than or equal to 16"),
        ({"n": 3, "extra_body": {"num_beams": 2}}, "n (3) must not exceed num_beams (2)"),
        ({"n": 2, "temperature": 0}, "n (2) needs sampling (a temperature above 0)"),
        (
            {"messages": [{"role": "user", "content": [image_part(), image_part(1)]}]},
            "several images",
        ),
        ({"messages": [{"role": "user", "content": "hello"}]}, "needs an image"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_unsupported_is_a_clear_400(
    openai_client: openai.OpenAI, kwargs: dict[str, object], message: str
) -> None:
    request = {
        "model": "blip2",
        "messages": [{"role": "user", "content": [image_part()]}],
        **kwargs,
    }
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(**request)  # type: ignore[call-overload]
    assert message in str(info.value)


def test_wrong_key(openai_server: RunningServer) -> None:
    bad = openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_image_is_400(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model="blip2",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ],
        )
    assert "messages: " in str(info.value)
