"""The OpenAI chat route in process, over the tiny BLIP-2 (OPT): the answer's shape and
usage, ``length`` finishes, errors, the key.  The official ``openai`` client against a
real server: tests/integration/test_openai.py; the request's parsing:
tests/unit/test_openai_contract.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from blipserve.config import ModelConfig, ServerConfig, Settings
from blipserve.contracts.openai_stream import ChunkWriter
from blipserve.models.streaming import RowStreamer
from blipserve.server import chat_stream
from blipserve.server.app import ServerState, create_app
from blipserve.types import Prediction
from helpers import b64_png

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def image_part(seed: int = 0) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64_png(seed)}"}}


@pytest.fixture(scope="module")
def blip2_client(tiny_model_dir: dict[str, Path]) -> Iterator[TestClient]:
    """The app over the tiny BLIP-2 (OPT): prompting is the adapter's own."""
    model = ModelConfig(model=str(tiny_model_dir["blip2-opt"]), dtype="float32", backend="torch")
    settings = Settings(model=model, server=ServerConfig(api_keys=(KEY,), warmup=False))
    app = create_app(settings)
    state: ServerState = app.state.blipserve
    state.load()
    yield TestClient(app, headers=AUTH)
    state.shutdown()


def chat(*content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "blip2", "messages": [{"role": "user", "content": list(content)}], **extra}


def test_chat_completion(blip2_client: TestClient) -> None:
    question = {"type": "text", "text": "what is it?"}
    response = blip2_client.post("/v1/chat/completions", json=chat(image_part(), question))
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["id"] == f"chatcmpl-{response.headers['x-request-id']}"
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert "Question:" not in choice["message"]["content"]  # the prompt is not echoed
    usage = answer["usage"]
    assert usage["prompt_tokens"] >= 7  # "Question: what is it? Answer:"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_finish_reason_length(blip2_client: TestClient) -> None:
    body = chat(image_part(3), max_tokens=2, min_tokens=2)
    answer = blip2_client.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            chat(image_part(), stream_options={"include_usage": True}),
            "stream_options is only allowed",
        ),
        (chat(image_part(), image_part(1)), "several images"),
        (chat({"type": "text", "text": "hello"}), "needs an image"),
        (
            chat(image_part(), tools=[{"type": "function", "function": {"name": "f"}}]),
            "tools",
        ),
        (
            chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
            "messages: ",
        ),
    ],
)
def test_chat_errors_are_400(blip2_client: TestClient, body: dict[str, Any], message: str) -> None:
    response = blip2_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_chat_needs_the_key(blip2_client: TestClient) -> None:
    response = TestClient(blip2_client.app).post("/v1/chat/completions", json=chat(image_part()))
    assert response.status_code == 401


def events(response: Any) -> list[Any]:
    """The JSON of each ``data:`` event of a streamed answer ("[DONE]" as it is)."""
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_streams_the_same_answer(blip2_client: TestClient) -> None:
    body = chat(image_part(4), max_tokens=12, min_tokens=12, temperature=0)
    whole = blip2_client.post("/v1/chat/completions", json=body).json()
    response = blip2_client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["id"] == f"chatcmpl-{response.headers['x-request-id']}" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_a_failure_after_the_first_chunk_ends_the_stream_with_an_error_event(
    blip2_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    send = RowStreamer.send

    def fail_after_a_piece(self: RowStreamer, seq: int, stable: str) -> None:
        send(self, seq, stable)
        if self.sent[seq]:
            raise RuntimeError("the GPU fell off")

    monkeypatch.setattr(RowStreamer, "send", fail_after_a_piece)
    body = chat(image_part(4), max_tokens=12, min_tokens=12, temperature=0, stream=True)
    response = blip2_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200  # the first chunk had gone out
    got = events(response)
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert got[1]["choices"][0]["delta"]["content"]
    assert got[-1]["error"]["code"] == 500
    assert "the GPU fell off" in got[-1]["error"]["message"]


def test_a_stream_closed_early_drops_its_row() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Prediction] = loop.create_future()
        pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        writer = ChunkWriter("r", "m", include_usage=False)
        stream = chat_stream._events(
            writer, answer, pieces, (0, "a"), limit=5, prompt_tokens=1, choices=1
        )
        assert b"assistant" in await anext(stream)
        assert b'"a"' in await anext(stream)
        await stream.aclose()  # what the server does when the client goes away
        assert answer.cancelled()  # (queue.run's cancellation marks its rows abandoned)

    asyncio.run(scenario())


def test_an_answer_that_is_not_what_was_streamed_ends_with_an_error_event() -> None:
    # A sampled row whose batch ran out of memory runs again and may draw another answer
    # than the one its first pieces came from.
    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Prediction] = loop.create_future()
        answer.set_result(Prediction("a dog", tokens=2))
        pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        writer = ChunkWriter("r", "m", include_usage=False)
        stream = chat_stream._events(
            writer, answer, pieces, (0, "a cat "), limit=5, prompt_tokens=1, choices=1
        )
        return [event async for event in stream]

    sent = [e.decode().removeprefix("data: ").strip() for e in asyncio.run(scenario())]
    assert "[DONE]" not in sent
    role, content, error = (json.loads(e) for e in sent)
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert content["choices"][0]["delta"]["content"] == "a cat "
    assert error["error"]["code"] == 500
    assert "the answer changed after part of it was sent" in error["error"]["message"]
