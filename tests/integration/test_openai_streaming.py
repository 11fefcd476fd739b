"""``"stream": true`` with the official `openai` client's streaming iterator against the real
server (the tiny BLIP-2 OPT, and BLIP captioning): the chunks add up to the non-streamed
answer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from helpers import b64_png
from live_server import OPENAI_KEY, openai_client_of
from testkit.live_server import RunningServer


def messages(seed: int = 0, question: str | None = None) -> Any:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64_png(seed)}"}}
    ]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def streamed(openai_client: openai.OpenAI, **request: Any) -> list[ChatCompletionChunk]:
    return list(openai_client.chat.completions.create(model="blip2", stream=True, **request))


def texts(chunks: list[ChatCompletionChunk]) -> dict[int, str]:
    out: dict[int, str] = defaultdict(str)
    for chunk in chunks:
        for choice in chunk.choices:
            out[choice.index] += choice.delta.content or ""
    return dict(out)


def finishes(chunks: list[ChatCompletionChunk]) -> dict[int, str]:
    return {c.index: c.finish_reason for k in chunks for c in k.choices if c.finish_reason}


GREEDY: dict[str, Any] = {"max_tokens": 16, "temperature": 0, "extra_body": {"min_tokens": 16}}


def test_the_chunks_add_up_to_the_answer(openai_client: openai.OpenAI) -> None:
    whole = openai_client.chat.completions.create(model="blip2", messages=messages(), **GREEDY)
    chunks = streamed(openai_client, messages=messages(), **GREEDY)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert texts(chunks) == {0: whole.choices[0].message.content}
    assert finishes(chunks) == {0: whole.choices[0].finish_reason} == {0: "length"}
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage anywhere
    # Sent as decoded: a 16-token answer comes in several pieces, not whole at the end.
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1


def test_a_question_and_include_usage(openai_client: openai.OpenAI) -> None:
    asked = messages(1, "what is it?")
    whole = openai_client.chat.completions.create(model="blip2", messages=asked, **GREEDY)
    usage = {"include_usage": True}
    chunks = streamed(openai_client, messages=asked, stream_options=usage, **GREEDY)
    assert texts(chunks) == {0: whole.choices[0].message.content}
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_n_streams_each_choice_with_its_index(openai_client: openai.OpenAI) -> None:
    # beams: deterministic, so the streamed choices equal the non-streamed ones
    beams: dict[str, Any] = {"max_tokens": 6, "n": 2, "extra_body": {"num_beams": 2}}
    whole = openai_client.chat.completions.create(model="blip2", messages=messages(2), **beams)
    chunks = streamed(openai_client, messages=messages(2), **beams)
    assert texts(chunks) == {c.index: c.message.content for c in whole.choices}
    assert finishes(chunks) == {c.index: c.finish_reason for c in whole.choices}

    # samples: each index streams its own text, as it is drawn
    sampled = streamed(
        openai_client,
        messages=messages(2),
        n=2,
        max_tokens=8,
        temperature=1.0,
        stream_options={"include_usage": True},
    )
    assert set(texts(sampled)) == set(finishes(sampled)) == {0, 1}
    roles = [c.choices[0].index for c in sampled if c.choices and c.choices[0].delta.role]
    assert roles == [0, 1]
    assert sampled[-1].usage is not None


def test_errors_before_the_first_chunk_are_json(
    openai_client: openai.OpenAI, openai_server: RunningServer
) -> None:
    bad = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        streamed(openai_client, messages=bad, max_tokens=4)
    assert caught.value.status_code == 400
    assert caught.value.response.headers["content-type"].startswith("application/json")

    # raw HTTP: the same 400 body as without streaming; streaming options need a stream
    headers = {"Authorization": f"Bearer {OPENAI_KEY}"}
    url = f"{openai_server.url}/v1/chat/completions"
    for body in (
        {"model": "m", "messages": bad, "stream": True},
        {"model": "m", "messages": messages(), "stream_options": {"include_usage": True}},
    ):
        reply = httpx.post(url, json=body, headers=headers, timeout=30)
        assert reply.status_code == 400
        assert "message" in reply.json()


def test_raw_events_end_with_done(openai_server: RunningServer) -> None:
    body = {"model": "m", "messages": messages(3), "stream": True, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {OPENAI_KEY}"}
    with httpx.stream(
        "POST", f"{openai_server.url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_blip_captions_stream_with_their_prefix(
    server_factory: Callable[..., RunningServer], tiny_model_dir: dict[str, Path]
) -> None:
    # BLIP's caption continues (and includes) the text it is given: the first piece holds it.
    blip = openai_client_of(server_factory(tiny_model_dir["blip-caption"], "--api-key", OPENAI_KEY))
    asked = messages(2, "a picture of")
    whole = blip.chat.completions.create(model="blip", messages=asked, **GREEDY)
    chunks = list(blip.chat.completions.create(model="blip", messages=asked, stream=True, **GREEDY))
    answer = whole.choices[0].message.content
    assert answer is not None
    assert answer.startswith("a picture of")
    assert texts(chunks) == {0: answer}
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    pieces = [piece for piece in pieces if piece]
    assert pieces[0].startswith("a picture of")
    assert len(pieces) > 1  # as decoded, not whole at the end
