"""The online engine without HTTP: deadlines, disconnects and refusals of the path the
server's routes take, on an event loop whose clock moves only when the test says."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from blipserve.config import EngineConfig
from blipserve.engine import Engine
from blipserve.engine.online import OnlineEngine
from blipserve.errors import DeadlineExceeded, InferenceError, InvalidRequest, Overloaded, RowError
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput
from fakes import EchoAdapter, VirtualTimeLoop, run_on_virtual_time
from helpers import b64_png

PARAMS = GenerationParams()
LATER_S = 60.0  # a deadline no test reaches


class Decoded:
    """The engine's observer; :meth:`next` waits for a request's rows to be decoded.

    ``decoded`` is called on the event loop just before the request's rows are queued,
    with no ``await`` in between: when :meth:`next` returns, they are in the queue.
    """

    def __init__(self) -> None:
        self.requests: asyncio.Queue[int] = asyncio.Queue()

    def decoded(self, seconds: float, bad_rows: int) -> None:
        self.requests.put_nowait(bad_rows)

    async def next(self) -> int:
        return await self.requests.get()

    def queue_depth(self, rows: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits_s: Any, model_s: float) -> None:
        pass


@pytest.fixture
def model() -> EchoAdapter:
    return EchoAdapter()  # (released by the fixtures that run it)


@pytest.fixture
def observer() -> Decoded:
    return Decoded()


@pytest.fixture
def online(model: EchoAdapter, observer: Decoded) -> Iterator[OnlineEngine]:
    engine = Engine(model, config=EngineConfig(max_batch_size=4, decode_workers=2))
    served = OnlineEngine(engine, max_wait_s=0, max_queue=4, observer=observer)
    served.start()
    yield served
    model.release()
    served.stop(timeout=5)


def row(text: str, position: int = 0) -> RowInput:
    return RowInput(position, b64_png(position), text)


async def ask(online: OnlineEngine, *texts: str, within: float = LATER_S) -> list[Prediction]:
    rows = [row(t, i) for i, t in enumerate(texts)]
    return await online.predict(rows, PARAMS, VirtualTimeLoop.running().time() + within)


async def busy_model(online: OnlineEngine, model: EchoAdapter) -> asyncio.Task[list[Prediction]]:
    """A request whose row the (held) model is running when this returns."""
    model.hold()
    busy = asyncio.create_task(ask(online, "busy"))
    await asyncio.to_thread(model.started.wait, 5)
    return busy


async def then_the_rest(online: OnlineEngine, model: EchoAdapter, busy: asyncio.Task[Any]) -> None:
    """Let the model go, and wait until it has passed every row queued so far."""
    model.release()
    await busy
    assert await ask(online, "after") == [Prediction("echo after", tokens=2)]


def test_rows_come_back_in_order(online: OnlineEngine, model: EchoAdapter) -> None:
    answers = run_on_virtual_time(ask(online, "a", "b", "c"))
    assert [p.text for p in answers] == ["echo a", "echo b", "echo c"]
    assert model.batches == [["a", "b", "c"]]


def test_a_deadline_passing_in_the_queue_drops_the_row(
    online: OnlineEngine, model: EchoAdapter, observer: Decoded
) -> None:
    async def main() -> None:
        busy = await busy_model(online, model)
        late = asyncio.create_task(ask(online, "late", within=1.0))
        await observer.next()  # "busy"
        await observer.next()  # "late": decoded, and now queued behind "busy"
        VirtualTimeLoop.running().advance(1.0)
        with pytest.raises(DeadlineExceeded, match="did not finish within its deadline"):
            await late
        await then_the_rest(online, model, busy)

    run_on_virtual_time(main())
    assert model.texts() == ["busy", "after"]
    assert online.queue.depth == 0


def test_a_deadline_passing_while_decoding_queues_nothing(
    online: OnlineEngine, model: EchoAdapter, observer: Decoded
) -> None:
    async def main() -> None:
        with pytest.raises(DeadlineExceeded, match="while its images were being fetched"):
            await ask(online, "too late", within=0)
        assert observer.requests.empty()  # never decoded to the end, never queued
        assert await ask(online, "after") == [Prediction("echo after", tokens=2)]

    run_on_virtual_time(main())
    assert model.texts() == ["after"]


def test_a_disconnected_clients_rows_are_dropped(
    online: OnlineEngine, model: EchoAdapter, observer: Decoded
) -> None:
    async def main() -> None:
        busy = await busy_model(online, model)
        gone = asyncio.create_task(ask(online, "gone"))
        await observer.next()
        await observer.next()  # "gone" is queued
        gone.cancel()  # what the server does when the client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        await then_the_rest(online, model, busy)

    run_on_virtual_time(main())
    assert model.texts() == ["busy", "after"]


def test_rows_that_cannot_be_queued_are_refused_before_decoding(
    online: OnlineEngine, model: EchoAdapter, observer: Decoded
) -> None:
    async def main() -> None:
        busy = await busy_model(online, model)
        await observer.next()
        waiting = asyncio.create_task(ask(online, "1", "2", "3"))  # 3 of the 4 places
        await observer.next()
        with pytest.raises(Overloaded, match=r"queue is full \(3 of 4 rows waiting\)"):
            await ask(online, "4", "5")
        assert observer.requests.empty()  # refused before its images were decoded
        await then_the_rest(online, model, busy)
        assert [p.text for p in await waiting] == ["echo 1", "echo 2", "echo 3"]

    run_on_virtual_time(main())
    assert model.texts() == ["busy", "1", "2", "3", "after"]


def test_a_request_larger_than_the_queue_is_refused_for_good(
    online: OnlineEngine, model: EchoAdapter, observer: Decoded
) -> None:
    async def main() -> None:
        # A 503 would tell the client to retry what can never fit.
        with pytest.raises(InvalidRequest, match="5 rows; this server queues at most 4 rows"):
            await ask(online, "1", "2", "3", "4", "5")
        assert observer.requests.empty()

    run_on_virtual_time(main())
    assert model.batches == []


def test_a_bad_row_refuses_the_request_and_queues_nothing(
    online: OnlineEngine, model: EchoAdapter
) -> None:
    async def main() -> None:
        rows = [row("fine", 0), RowInput(1, "@@@", "bad")]
        with pytest.raises(RowError, match="row 1: image is not valid base64"):
            await online.predict(rows, PARAMS, VirtualTimeLoop.running().time() + LATER_S)
        assert await ask(online, "after") == [Prediction("echo after", tokens=2)]

    run_on_virtual_time(main())
    assert model.texts() == ["after"]


def test_a_failing_batch_fails_its_request(online: OnlineEngine) -> None:
    with pytest.raises(InferenceError, match="boom"):
        run_on_virtual_time(ask(online, "boom"))
    assert run_on_virtual_time(ask(online, "fine")) == [Prediction("echo fine", tokens=2)]
