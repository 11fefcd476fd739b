"""A hosted batch job's rows behind the requests' on the online queue's one model thread:
requests first, a job's calls shrink while requests come, cancel and stop end the job."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from blipserve.engine.online_queue import BehindPolicy, OnlineQueue
from blipserve.errors import JobStopped
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction
from fakes import EchoAdapter

IMAGE = Image.new("RGB", (4, 4))


def item(text: str) -> ModelInput:
    return ModelInput(IMAGE, text, GenerationParams())


@pytest.fixture
def model() -> EchoAdapter:
    return EchoAdapter()


def start(model: EchoAdapter, policy: BehindPolicy | None = None) -> OnlineQueue:
    queue = OnlineQueue(model.predict, max_batch_size=4, max_wait_s=0, max_queue=8, behind=policy)
    queue.start()
    return queue


@pytest.fixture
def queue(model: EchoAdapter) -> Iterator[OnlineQueue]:
    q = start(model)
    yield q
    model.release()
    q.stop(timeout=5)


def in_thread(queue: OnlineQueue, texts: list[str], stop: threading.Event | None = None):  # type: ignore[no-untyped-def]
    """``run_behind`` on a thread of its own (a job's); its outcome in ``box``."""
    box: dict[str, object] = {}

    def job() -> None:
        try:
            box["results"] = queue.run_behind([item(t) for t in texts], stop)
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    return thread, box


def test_a_job_alone_runs_full_batches_in_order(queue: OnlineQueue, model: EchoAdapter) -> None:
    results = queue.run_behind([item(f"j{i}") for i in range(10)])
    assert [r.text for r in results if isinstance(r, Prediction)] == [
        f"echo j{i}" for i in range(10)
    ]
    assert [len(b) for b in model.batches] == [4, 4, 2]  # (no request came: full batches)


def test_requests_go_before_the_job_and_shrink_its_calls(
    queue: OnlineQueue, model: EchoAdapter
) -> None:
    model.hold()
    thread, box = in_thread(queue, [f"j{i}" for i in range(6)])
    assert model.started.wait(5)  # the job's first call holds the model

    async def request() -> list[str]:
        results = await queue.run([(item("r"), "k")], timeout=10)
        return [r.text for r in results if isinstance(r, Prediction)]

    async def main() -> list[str]:
        task = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        model.release()  # the job's call ends; the request's row runs next
        return await task

    assert asyncio.run(main()) == ["echo r"]
    thread.join(10)
    assert "results" in box, box
    assert model.batches[0] == ["j0", "j1", "j2", "j3"]  # the call that was running
    assert model.batches[1] == ["r"]  # then the request, before the rest of the job
    # (a request came in the last quiet_s: the job's calls are one row at a time now)
    assert [len(b) for b in model.batches[2:]] == [1, 1]


def test_the_job_takes_its_share_while_requests_come(model: EchoAdapter) -> None:
    """With share 0.5, after a call of d seconds the job waits about d before the next."""
    slow = EchoAdapter()

    def predict(items):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        return slow.predict(items)

    queue = OnlineQueue(
        predict, max_batch_size=4, max_wait_s=0, max_queue=8, behind=BehindPolicy(1, 0.5, 60)
    )
    queue.start()
    try:
        asyncio.run(queue.run([(item("r"), "k")], timeout=5))  # requests "are coming"
        started = time.monotonic()
        queue.run_behind([item(f"j{i}") for i in range(4)])
        took = time.monotonic() - started
    finally:
        queue.stop(timeout=5)
    # 4 one-row calls of 50 ms, each followed by 50 ms the job leaves to requests
    assert [len(b) for b in slow.batches[1:]] == [1, 1, 1, 1]
    assert took >= 0.33, took


def test_cancel_drops_the_rows_not_run(queue: OnlineQueue, model: EchoAdapter) -> None:
    model.hold()
    stop = threading.Event()
    first, _ = in_thread(queue, ["a0", "a1", "a2", "a3"])
    assert model.started.wait(5)
    second, box = in_thread(queue, ["b0", "b1"], stop)
    time.sleep(0.1)
    stop.set()
    second.join(5)
    assert isinstance(box.get("error"), JobStopped)
    model.release()
    first.join(5)
    assert "b0" not in model.texts()


def test_stopping_the_queue_stops_waiting_jobs(model: EchoAdapter) -> None:
    queue = start(model)
    model.hold()
    first, _ = in_thread(queue, ["a0"])
    assert model.started.wait(5)
    second, box = in_thread(queue, ["b0"])
    time.sleep(0.1)
    stopper = threading.Thread(target=queue.stop, kwargs={"timeout": 5})
    stopper.start()
    time.sleep(0.1)
    model.release()
    stopper.join(5)
    second.join(5)
    first.join(5)
    assert isinstance(box.get("error"), JobStopped)
    with pytest.raises(JobStopped):
        queue.run_behind([item("late")])


def test_the_servers_queue_takes_jobs_share_from_the_settings(model: EchoAdapter) -> None:
    from blipserve.config import JobsConfig, ModelConfig, Settings
    from blipserve.engine import Engine
    from blipserve.server.app import create_app
    from fakes import state_of

    settings = Settings(model=ModelConfig(model="echo"), jobs=JobsConfig(jobs_share=0.6))
    state = state_of(create_app(settings))
    state.load(Engine(model))
    try:
        assert state.online is not None
        assert state.online.queue.behind.share == 0.6
    finally:
        state.shutdown()
