"""``"stream": true`` on the chat route: the answer as server-sent events, as it is decoded.

The row is queued as any other (it shares batches with other requests), with a sink that
carries each piece of text from the model thread to this request's event loop
(``call_soon_threadsafe`` into an ``asyncio.Queue``).  Nothing is sent until the first piece
or the answer is there, so that every error the non-streamed route gives (a bad image, a
full queue, the deadline, the model failing) is still a JSON error with its status; one
after that ends the stream with an error event.  The pieces add up to the answer's text;
whatever the final answer holds beyond them (all of a beam search's text, which is not
streamed) is sent before each choice's ``finish_reason``; an answer that does not start with
what was sent ends the stream with an error event.  A client that goes away drops
its row (queued) or stops receiving it (running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from blipserve.contracts import openai as openai_contract
from blipserve.contracts.openai_stream import DONE, ChunkWriter, error_event
from blipserve.engine.online import OnlineEngine
from blipserve.errors import BlipserveError, InvalidInput, RowError
from blipserve.server.http import unless_disconnected
from blipserve.server.tracing import traced
from blipserve.types import Prediction, RowInput

log = logging.getLogger(__name__)

Piece = tuple[int, str]  # (choice index, text)
_CHANGED = (
    "the answer changed after part of it was sent (its batch ran out of memory and ran "
    "again); ask again"
)


async def stream_chat(
    request: Request,
    online: OnlineEngine,
    req: openai_contract.ChatRequest,
    prompt: str | None,
    deadline: float,
) -> StreamingResponse:
    """The streamed answer to ``req`` (its text to the model: ``prompt``); raises, like the
    non-streamed route, when it fails before its first piece of text."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Piece] = asyncio.Queue()

    def sink(index: int, text: str) -> None:  # on the model thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
            loop.call_soon_threadsafe(pieces.put_nowait, (index, text))

    row = RowInput(0, req.image, prompt)
    answer = online.predict([row], req.params, deadline, [sink], traced(request))
    task = asyncio.ensure_future(_answer(answer))
    try:
        first = await unless_disconnected(request, _next_piece(task, pieces))
        if first is None:
            task.result()  # raises what failed the request before its first piece
    except BaseException:
        task.cancel()
        raise
    adapter = online.engine.adapter
    writer = ChunkWriter(request.state.request_id, req.model, req.include_usage)
    events = _events(
        writer,
        task,
        pieces,
        first,
        limit=req.params.max_new_tokens or adapter.default_max_new_tokens,
        prompt_tokens=adapter.count_tokens(prompt),
        choices=req.params.num_return_sequences or 1,
    )
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _answer(work: Awaitable[list[Prediction]]) -> Prediction:
    try:
        [prediction] = await work
    except RowError as exc:  # as the non-streamed route words it
        raise InvalidInput(f"messages: {exc.reason}") from None
    return prediction


async def _next_piece(
    task: asyncio.Future[Prediction], pieces: asyncio.Queue[Piece]
) -> Piece | None:
    """The next piece of text, or ``None`` once the answer is there and no piece is left.

    (Every piece is queued before the answer: the model thread's callbacks run in order.)
    """
    if pieces.empty() and not task.done():
        getter = asyncio.ensure_future(pieces.get())
        try:
            either: set[asyncio.Future[Any]] = {task, getter}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
    return None if pieces.empty() else pieces.get_nowait()


async def _events(
    writer: ChunkWriter,
    task: asyncio.Future[Prediction],
    pieces: asyncio.Queue[Piece],
    first: Piece | None,
    *,
    limit: int,
    prompt_tokens: int,
    choices: int,
) -> AsyncGenerator[bytes]:
    sent = [""] * choices
    try:
        for index in range(choices):
            yield writer.role(index)
        piece = first
        while piece is not None:
            index, text = piece
            sent[index] += text
            yield writer.content(index, text)
            piece = await _next_piece(task, pieces)
        try:
            prediction = task.result()
        except BlipserveError as exc:
            yield error_event(exc.message, exc.status)
            return
        except Exception as exc:  # the route's own failure, not the model's answer
            log.exception("streamed chat failed")
            yield error_event(f"internal error: {type(exc).__name__}", 500)
            return
        answers = openai_contract.choices_of(prediction, limit)
        for index, answer in enumerate(answers):
            if not answer.text.startswith(sent[index]):
                # What the client has is not the answer (a sampled row whose batch ran out
                # of memory ran again and drew anew): say so rather than finish it.
                log.warning("streamed text of choice %d is not the answer's start", index)
                yield error_event(_CHANGED, 500)
                return
            if len(answer.text) > len(sent[index]):
                yield writer.content(index, answer.text[len(sent[index]) :])
            yield writer.finish(index, answer.finish_reason)
        if writer.include_usage:
            yield writer.usage(answers, prompt_tokens)
        yield DONE
    finally:
        task.cancel()  # the client went away: its row drops (when still queued)
