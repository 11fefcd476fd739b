"""The dynamic batcher with a fake model: merging, keys, limits, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest
from PIL import Image

from blipserve.engine.online_queue import OnlineQueue
from blipserve.errors import DeadlineExceeded, InferenceError, Overloaded
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction

IMAGE = Image.new("RGB", (4, 4))


def item(text: str) -> ModelInput:
    return ModelInput(IMAGE, text, GenerationParams())


class FakeModel:
    """Echoes each row's text; records batches; can be held to pile rows up."""

    def __init__(self) -> None:
        self.batches: list[list[str | None]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, items: Sequence[ModelInput]) -> list[Prediction]:
        self.started.set()
        self.gate.wait(5)
        texts = [i.text for i in items]
        self.batches.append(texts)
        if "boom" in texts:
            raise InferenceError("the model failed on this batch: boom")
        return [Prediction(f"echo {t}") for t in texts]


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def batcher(model: FakeModel) -> Iterator[OnlineQueue]:
    b = OnlineQueue(model, max_batch_size=4, max_wait_s=0.2, max_queue=8)
    b.start()
    yield b
    model.gate.set()
    b.stop(timeout=5)


def test_concurrent_requests_share_one_batch(batcher: OnlineQueue, model: FakeModel) -> None:
    async def main() -> list[list[object]]:
        calls = [batcher.run([(item(f"r{i}"), "k")], timeout=5) for i in range(4)]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(main())
    assert results == [[Prediction(f"echo r{i}")] for i in range(4)]
    assert model.batches == [["r0", "r1", "r2", "r3"]]


def test_rows_with_different_keys_are_not_mixed(batcher: OnlineQueue, model: FakeModel) -> None:
    async def main() -> list[object]:
        rows = [(item("a1"), "a"), (item("b1"), "b"), (item("a2"), "a")]
        return await batcher.run(rows, timeout=5)

    assert asyncio.run(main()) == [
        Prediction("echo a1"),
        Prediction("echo b1"),
        Prediction("echo a2"),
    ]
    assert sorted(model.batches) == [["a1", "a2"], ["b1"]]


def test_batch_size_is_capped(batcher: OnlineQueue, model: FakeModel) -> None:
    async def main() -> list[object]:
        return await batcher.run([(item(str(i)), "k") for i in range(6)], timeout=5)

    assert len(asyncio.run(main())) == 6
    assert [len(b) for b in model.batches] == [4, 2]


def test_full_queue_is_refused_at_once(batcher: OnlineQueue, model: FakeModel) -> None:
    model.gate.clear()

    async def main() -> None:
        first = asyncio.create_task(batcher.run([(item("x"), "k")], timeout=5))
        await asyncio.to_thread(model.started.wait, 5)  # the model is now busy
        held = asyncio.create_task(batcher.run([(item(str(i)), "k") for i in range(8)], timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.run([(item("late"), "k")], timeout=5)
        model.gate.set()
        await first
        assert len(await held) == 8

    asyncio.run(main())


def test_deadline_drops_queued_work(batcher: OnlineQueue, model: FakeModel) -> None:
    model.gate.clear()

    async def main() -> None:
        busy = asyncio.create_task(batcher.run([(item("busy"), "k")], timeout=5))
        await asyncio.to_thread(model.started.wait, 5)
        with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.1 s"):
            await batcher.run([(item("slow"), "other")], timeout=0.1)
        model.gate.set()
        await busy
        await asyncio.sleep(0.3)  # let the model thread look at the queue again

    asyncio.run(main())
    assert ["slow"] not in model.batches
    assert batcher.depth == 0


def test_cancelled_request_is_dropped(batcher: OnlineQueue, model: FakeModel) -> None:
    model.gate.clear()

    async def main() -> None:
        busy = asyncio.create_task(batcher.run([(item("busy"), "k")], timeout=5))
        await asyncio.to_thread(model.started.wait, 5)
        gone = asyncio.create_task(batcher.run([(item("gone"), "other")], timeout=5))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)  # let the cancellation run before the model frees up
        model.gate.set()
        await busy
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert ["gone"] not in model.batches


def test_failed_batch_fails_only_its_rows(batcher: OnlineQueue) -> None:
    async def main() -> list[object]:
        return await batcher.run([(item("boom"), "bad"), (item("fine"), "good")], timeout=5)

    bad, good = asyncio.run(main())
    assert isinstance(bad, InferenceError)
    assert good == Prediction("echo fine")


def test_stop_finishes_queued_rows(model: FakeModel) -> None:
    b = OnlineQueue(model, max_batch_size=2, max_wait_s=10.0, max_queue=8)
    b.start()

    async def main() -> list[object]:
        task = asyncio.create_task(b.run([(item("q"), "k")], timeout=5))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(b.stop, 5)  # would otherwise wait 10 s for company
        return await task

    assert asyncio.run(main()) == [Prediction("echo q")]
