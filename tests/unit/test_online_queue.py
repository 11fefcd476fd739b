"""The online queue with a stand-in model and a fake clock: merging, keys, limits,
``max_wait_s``, deadlines, cancellation.  No HTTP, no sleeping: the tests hold the model
(``EchoAdapter.hold``) and move the clock themselves."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Hashable, Iterator, Sequence

import pytest
from PIL import Image

from blipserve.engine.online_queue import OnlineQueue, Result
from blipserve.errors import DeadlineExceeded, InferenceError, Overloaded
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction
from fakes import EchoAdapter, FakeClock

IMAGE = Image.new("RGB", (4, 4))
Rows = Sequence[tuple[ModelInput, Hashable]]


def item(text: str) -> ModelInput:
    return ModelInput(IMAGE, text, GenerationParams())


def rows(*texts: str, key: Hashable = "k") -> list[tuple[ModelInput, Hashable]]:
    return [(item(t), key) for t in texts]


async def queued(queue: OnlineQueue, rows: Rows, timeout: float = 5) -> asyncio.Task[list[Result]]:
    """``queue.run(rows)`` as a task whose rows are in the queue when this returns.

    ``run`` queues its rows before its first ``await``, so one turn of the event loop lets
    the task get that far (``sleep(0)`` yields to the loop; it waits for no time).
    """
    task = asyncio.create_task(queue.run(rows, timeout=timeout))
    await asyncio.sleep(0)
    return task


class Waits:
    """The queue's observer: each batch's size and its rows' time in the queue."""

    def __init__(self) -> None:
        self._batches: list[tuple[int, list[float]]] = []
        self._changed = threading.Condition()

    def queue_depth(self, rows: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits_s: Sequence[float], model_s: float) -> None:
        with self._changed:
            self._batches.append((size, list(queue_waits_s)))
            self._changed.notify_all()

    def batches(self, count: int) -> list[tuple[int, list[float]]]:
        """The first ``count`` batches, once reported (after their rows' results)."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self._batches) >= count, timeout=5)
            return self._batches[:]


@pytest.fixture
def model() -> EchoAdapter:
    return EchoAdapter()  # (released by the fixtures that run it)


@pytest.fixture
def batcher(model: EchoAdapter) -> Iterator[OnlineQueue]:
    """No waiting for company (``max_wait_s`` 0): every row is due when it arrives."""
    queue = OnlineQueue(model.predict, max_batch_size=4, max_wait_s=0, max_queue=8)
    queue.start()
    yield queue
    model.release()
    queue.stop(timeout=5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def waiting(model: EchoAdapter, clock: FakeClock, waits: Waits) -> Iterator[OnlineQueue]:
    """A first row waits up to 1 s of the fake clock for others to join it."""
    queue = OnlineQueue(
        model.predict, max_batch_size=4, max_wait_s=1.0, max_queue=8, observer=waits, clock=clock
    )
    queue.start()
    yield queue
    model.release()
    queue.stop(timeout=5)


def later(clock: FakeClock, queue: OnlineQueue, seconds: float) -> None:
    clock.advance(seconds)
    queue.wake()


async def looked(clock: FakeClock) -> None:
    """Wait until the model thread has looked at the queue at the clock's present time
    (and decided whether a batch is due: it decides under the lock that queueing takes)."""
    await asyncio.to_thread(clock.wait_until_read_at, clock.now)


# -- batching ------------------------------------------------------------------------------


def test_a_full_batch_goes_without_waiting(waiting: OnlineQueue, model: EchoAdapter) -> None:
    async def main() -> list[list[Result]]:
        calls = [waiting.run(rows(f"r{i}"), timeout=5) for i in range(4)]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(main())  # the clock never moves: only a full batch can run
    assert results == [[Prediction(f"echo r{i}", tokens=2)] for i in range(4)]
    assert model.batches == [["r0", "r1", "r2", "r3"]]


def test_rows_wait_for_company_until_max_wait_on_the_clock(
    waiting: OnlineQueue, model: EchoAdapter, clock: FakeClock, waits: Waits
) -> None:
    async def main() -> None:
        first = await queued(waiting, rows("a"))
        await looked(clock)  # "a" waits for company...
        later(clock, waiting, 0.6)
        await looked(clock)  # ...still, 0.6 s on
        second = await queued(waiting, rows("b"))
        later(clock, waiting, 0.4)  # 1 s after the first row: the batch is due
        assert [await first, await second] == [
            [Prediction("echo a", tokens=2)],
            [Prediction("echo b", tokens=2)],
        ]

    asyncio.run(main())
    assert model.batches == [["a", "b"]]
    assert waits.batches(1) == [(2, [1.0, 0.4])]  # each row's wait, by the queue's clock


def test_a_row_alone_goes_after_max_wait_without_company(
    waiting: OnlineQueue, model: EchoAdapter, clock: FakeClock, waits: Waits
) -> None:
    async def main() -> None:
        first = await queued(waiting, rows("a"))
        later(clock, waiting, 1.0)
        await first
        second = await queued(waiting, rows("b"))  # arrives after the first batch left
        later(clock, waiting, 1.0)
        await second

    asyncio.run(main())
    assert model.batches == [["a"], ["b"]]
    assert waits.batches(2) == [(1, [1.0]), (1, [1.0])]


def test_rows_with_different_keys_are_not_mixed(batcher: OnlineQueue, model: EchoAdapter) -> None:
    async def main() -> list[Result]:
        return await batcher.run(
            [*rows("a1", key="a"), *rows("b1", key="b"), *rows("a2", key="a")], timeout=5
        )

    assert asyncio.run(main()) == [
        Prediction("echo a1", tokens=2),
        Prediction("echo b1", tokens=2),
        Prediction("echo a2", tokens=2),
    ]
    assert sorted(model.batches) == [["a1", "a2"], ["b1"]]


def test_batch_size_is_capped(batcher: OnlineQueue, model: EchoAdapter) -> None:
    async def main() -> list[Result]:
        return await batcher.run(rows(*(str(i) for i in range(6))), timeout=5)

    assert len(asyncio.run(main())) == 6
    assert [len(b) for b in model.batches] == [4, 2]


def test_failed_batch_fails_only_its_rows(batcher: OnlineQueue) -> None:
    async def main() -> list[Result]:
        return await batcher.run([*rows("boom", key="bad"), *rows("fine", key="good")], timeout=5)

    bad, good = asyncio.run(main())
    assert isinstance(bad, InferenceError)
    assert good == Prediction("echo fine", tokens=2)


# -- limits, deadlines, cancellation ------------------------------------------------------


def test_full_queue_is_refused_at_once(batcher: OnlineQueue, model: EchoAdapter) -> None:
    model.hold()

    async def main() -> None:
        busy = await queued(batcher, rows("x"))
        await asyncio.to_thread(model.started.wait, 5)  # the model holds "x"; the queue is empty
        held = await queued(batcher, rows(*(str(i) for i in range(8))))
        assert batcher.depth == 8
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.run(rows("late"), timeout=5)
        model.release()
        await busy
        assert len(await held) == 8

    asyncio.run(main())
    assert "late" not in model.texts()


async def after_everything(queue: OnlineQueue) -> None:
    """Wait for a row queued now: the model thread has passed every row queued earlier."""
    await queue.run(rows("after"), timeout=5)


def test_deadline_drops_queued_work(batcher: OnlineQueue, model: EchoAdapter) -> None:
    model.hold()

    async def main() -> None:
        busy = await queued(batcher, rows("busy"))
        await asyncio.to_thread(model.started.wait, 5)
        # a deadline of 0 s passes at the first wait, while the row is queued behind "busy"
        with pytest.raises(DeadlineExceeded, match=r"within its deadline of 0 s"):
            await batcher.run(rows("slow", key="other"), timeout=0)
        model.release()
        await busy
        await after_everything(batcher)

    asyncio.run(main())
    assert model.texts() == ["busy", "after"]
    assert batcher.depth == 0


def test_cancelled_request_is_dropped(batcher: OnlineQueue, model: EchoAdapter) -> None:
    model.hold()

    async def main() -> None:
        busy = await queued(batcher, rows("busy"))
        await asyncio.to_thread(model.started.wait, 5)
        gone = await queued(batcher, rows("gone", key="other"))
        gone.cancel()  # as the server does when the client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        model.release()
        await busy
        await after_everything(batcher)

    asyncio.run(main())
    assert model.texts() == ["busy", "after"]


def test_stop_finishes_queued_rows(waiting: OnlineQueue, model: EchoAdapter) -> None:
    async def main() -> list[Result]:
        task = await queued(waiting, rows("q"))
        # the clock never moves, so "q" would wait for company for ever
        await asyncio.to_thread(waiting.stop, 5)
        return await task

    assert asyncio.run(main()) == [Prediction("echo q", tokens=2)]
    with pytest.raises(Overloaded, match="shutting down"):
        waiting.refuse_if_full(1)
