"""Out of memory in a model call: the same rows again in smaller calls, the size that fits
remembered (:mod:`blipserve.engine.batch_size`), on a fake allocator with a fixed budget."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
import torch
from PIL import Image

from blipserve.config import EngineConfig
from blipserve.engine import Engine
from blipserve.engine.batch_size import BatchSizer, SentOnce
from blipserve.errors import InferenceError
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction, RowInput, TextSink
from fakes import EchoAdapter
from helpers import b64_png


class FakeAllocator:
    """Device memory of ``budget`` bytes; what a call allocates is freed when it returns."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.in_use = 0
        self.peak = 0
        self.lock = threading.Lock()

    def allocate(self, nbytes: int) -> None:
        with self.lock:
            if self.in_use + nbytes > self.budget:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes} bytes "
                    f"({self.budget - self.in_use} free)"
                )
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)

    def free(self, nbytes: int) -> None:
        with self.lock:
            self.in_use -= nbytes


class MemoryBoundAdapter(EchoAdapter):
    """Echo, whose rows each take ``per_row`` bytes (``max_new_tokens`` times that with a
    limit: longer texts need more cache) from a fake allocator, for the whole call."""

    def __init__(self, allocator: FakeAllocator, per_row: int) -> None:
        super().__init__()
        self.allocator = allocator
        self.per_row = per_row
        self.calls: list[int] = []  # rows in each call the model was given, OOM or not

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        self.calls.append(len(items))
        for item in items:  # a streamed row's first piece, before the call's memory runs out
            if item.on_text:
                item.on_text(0, "echo ")
        need = len(items) * self.per_row * (items[0].params.max_new_tokens or 1)
        self.allocator.allocate(need)
        try:
            answers = super().predict(items)
        finally:
            self.allocator.free(need)
        for item, answer in zip(items, answers, strict=True):
            if item.on_text:
                item.on_text(0, answer.text.removeprefix("echo "))
        return answers


@pytest.fixture
def allocator() -> FakeAllocator:
    return FakeAllocator(budget=5_000)  # 5 rows of 1,000 bytes


@pytest.fixture
def model(allocator: FakeAllocator) -> MemoryBoundAdapter:
    return MemoryBoundAdapter(allocator, per_row=1_000)


@pytest.fixture
def engine(model: MemoryBoundAdapter) -> Iterator[Engine]:
    with Engine(model, config=EngineConfig(max_batch_size=16, model_workers=1)) as loaded:
        yield loaded


def rows(n: int) -> list[RowInput]:
    return [RowInput(i, b64_png(i % 3), f"row {i}") for i in range(n)]


def texts(outcomes: Sequence[object]) -> list[str]:
    assert all(isinstance(o, Prediction) for o in outcomes), outcomes
    return [o.text for o in outcomes if isinstance(o, Prediction)]


def test_a_batch_too_big_is_run_again_in_halves_and_no_row_is_lost(
    engine: Engine, model: MemoryBoundAdapter, allocator: FakeAllocator
) -> None:
    got = texts(engine.predict(rows(16)))
    assert got == [f"echo row {i}" for i in range(16)]  # every row, in order
    assert model.calls == [16, 8, 4, 4, 4, 4]  # 16 and 8 ran out of memory; 4 fits
    assert allocator.in_use == 0
    assert allocator.peak <= allocator.budget
    # Remembered: the next batch goes straight to 4 rows a call, with no failed call.
    model.calls.clear()
    assert texts(engine.predict(rows(10))) == [f"echo row {i}" for i in range(10)]
    assert model.calls == [4, 4, 2]


def test_what_fits_is_remembered_per_generation_setting(
    engine: Engine, model: MemoryBoundAdapter
) -> None:
    texts(engine.predict(rows(8)))  # 8 -> 4
    long = GenerationParams(max_new_tokens=2)  # twice the memory a row: 2 rows a call
    model.calls.clear()
    assert len(texts(engine.predict(rows(8), long))) == 8
    assert model.calls == [8, 4, 2, 2, 2, 2]  # its own size, from the configured one
    model.calls.clear()
    texts(engine.predict(rows(8)))  # the short setting kept its own
    assert model.calls == [4, 4]
    assert set(engine.runner.sizer.known().values()) == {4, 2}


def test_a_row_that_never_fits_fails_alone_and_the_engine_goes_on(
    engine: Engine, model: MemoryBoundAdapter
) -> None:
    huge = GenerationParams(max_new_tokens=6)  # 6,000 bytes for one row: never fits
    outcomes = engine.predict(rows(3), huge)
    assert all(isinstance(o, InferenceError) for o in outcomes)
    assert "out of memory on a single row" in str(outcomes[0])
    assert texts(engine.predict(rows(3))) == [f"echo row {i}" for i in range(3)]


def test_concurrent_batches_share_what_was_learnt(allocator: FakeAllocator) -> None:
    # Two model workers each running a batch: together they may run out where one would not.
    model = MemoryBoundAdapter(allocator, per_row=1_000)
    config = EngineConfig(max_batch_size=4, model_workers=2)
    with Engine(model, config=config) as engine:
        got = texts(engine.predict(rows(24)))
    assert got == [f"echo row {i}" for i in range(24)]
    assert allocator.peak <= allocator.budget


def test_a_streamed_row_that_runs_again_sends_each_piece_once(
    engine: Engine, model: MemoryBoundAdapter
) -> None:
    got: dict[int, list[str]] = {i: [] for i in range(8)}

    def sink_of(row: int) -> TextSink:
        return lambda _index, piece: got[row].append(piece)

    image = Image.new("RGB", (8, 8))
    items = [ModelInput(image, f"row {i}", GenerationParams(), sink_of(i)) for i in range(8)]
    answers = engine.run_batch(items)  # as the online queue calls it
    assert model.calls == [8, 4, 4]  # every row sent "echo " before the first call failed
    assert [a.text for a in answers] == [f"echo row {i}" for i in range(8)]
    assert {i: "".join(pieces) for i, pieces in got.items()} == {
        i: f"echo row {i}" for i in range(8)
    }


def test_a_run_that_says_something_else_sends_nothing_more() -> None:
    pieces: list[str] = []
    sink = SentOnce(lambda _, piece: pieces.append(piece))
    sink(0, "a b")
    sink.again()  # (sampling draws anew)
    sink(0, "a ")
    sink(0, "c d")
    sink(0, " e")
    assert pieces == ["a b"]


def test_sizer_halves_from_the_failed_call() -> None:
    sizer = BatchSizer(64)
    assert sizer.limit("a") == 64
    assert sizer.out_of_memory("a", 64) == 32
    assert sizer.out_of_memory("a", 20) == 10  # a shorter final call failed
    assert sizer.out_of_memory("a", 64) == 10  # a call started before the last lesson
    assert sizer.limit("b") == 64
    with pytest.raises(InferenceError, match="single row"):
        sizer.out_of_memory("a", 1)


def test_sizer_grows_back_after_full_calls_only() -> None:
    sizer = BatchSizer(64, probe_after=2)
    assert sizer.out_of_memory("a", 64) == 32
    sizer.fitted("a", 10)  # a call short of the size says nothing about it
    sizer.fitted("a", 32)
    assert sizer.limit("a") == 32
    sizer.fitted("a", 32)  # two full calls in a row: twice as many
    assert sizer.limit("a") == 64
    assert sizer.known() == {}  # back to the configured size
    sizer.fitted("b", 64)  # (a shape at the configured size: nothing to learn)
    assert sizer.known() == {}


def test_a_failed_try_goes_back_to_the_size_that_fitted() -> None:
    sizer = BatchSizer(64, probe_after=1)
    assert sizer.out_of_memory("a", 64) == 32
    sizer.fitted("a", 32)  # -> trying 64
    assert sizer.limit("a") == 64
    assert sizer.out_of_memory("a", 48) == 32  # (a short call of the try: not 24)
    sizer.fitted("a", 32)  # the wait is now 2 full calls
    assert sizer.limit("a") == 32
    sizer.fitted("a", 32)
    assert sizer.limit("a") == 64  # trying again
    assert sizer.out_of_memory("a", 20) == 10  # a call no larger than 32 failed: halve
    for _ in range(20):  # failed tries: the wait doubles, up to 64 full calls
        for _ in range(64):
            if sizer.limit("a") > 10:
                break
            sizer.fitted("a", 10)
        sizer.out_of_memory("a", 20)
    full = 0
    while sizer.limit("a") == 10:
        sizer.fitted("a", 10)
        full += 1
    assert full == 64


def test_batches_grow_back_when_memory_comes_back(
    engine: Engine, model: MemoryBoundAdapter, allocator: FakeAllocator
) -> None:
    # Another process held memory for a while: 4 rows a call were learnt.  When it is
    # back, after probe_after full calls the size doubles, up to the configured 16.
    texts(engine.predict(rows(16)))
    assert engine.runner.sizer.known() == {GenerationParams(): 4}
    engine.runner.sizer.probe_after = 2
    allocator.budget = 16_000
    model.calls.clear()
    for _ in range(3):
        assert texts(engine.predict(rows(16))) == [f"echo row {i}" for i in range(16)]
    # The lesson's four full calls of 4 count: 4 (the fifth: try 8), 8 (fits), 4 (not
    # full) | 8 (the second full call at 8: try 16, the configured size), 8 | 16
    assert model.calls == [4, 8, 4, 8, 8, 16]
    assert engine.runner.sizer.known() == {}
    assert engine.runner.sizer.out_of_memory_calls == 2  # (the lesson's 16 and 8)


def test_a_size_that_still_does_not_fit_is_tried_less_and_less(
    engine: Engine, model: MemoryBoundAdapter
) -> None:
    # The card really is that small: each failed try at 8 rows doubles the wait for the
    # next (2, 4, 8, 16 full calls), and costs one call run again; no row is lost.
    sizer = engine.runner.sizer
    texts(engine.predict(rows(8)))  # 8 -> 4
    sizer.probe_after = 2
    failed = sizer.out_of_memory_calls
    model.calls.clear()
    for _ in range(30):
        assert texts(engine.predict(rows(8))) == [f"echo row {i}" for i in range(8)]
    assert model.calls.count(8) == 4  # the tries, each run again as two calls of 4
    # 60 full calls of 4: tries after 2, 2 + 4, 6 + 8, 14 + 16, 30 + 32 of them
    assert sizer.out_of_memory_calls - failed == 4


def test_metrics_report_retries_and_the_size_that_fits(allocator: FakeAllocator) -> None:
    from starlette.testclient import TestClient

    from blipserve.config import ModelConfig, ServerConfig, Settings
    from blipserve.server.app import ServerState, create_app
    from helpers import score_body

    settings = Settings(model=ModelConfig(model="echo"), server=ServerConfig(warmup=False))
    app = create_app(settings)
    state = app.state.blipserve
    assert isinstance(state, ServerState)
    model = MemoryBoundAdapter(allocator, per_row=1_000)  # room for 5 rows
    state.load(Engine(model, config=EngineConfig(max_batch_size=8)))
    try:
        client = TestClient(app)
        body = score_body([[b64_png(i), f"row {i}"] for i in range(8)], ["image", "text"])
        response = client.post("/score", json=body)
        assert response.status_code == 200, response.text
        assert response.json() == [{"text": f"echo row {i}"} for i in range(8)]
        metrics = client.get("/metrics").text
        assert "blipserve_out_of_memory_retries_total 1.0" in metrics  # 8 failed, 4 fit
        assert "blipserve_batch_size_limit 4.0" in metrics
        client.post("/score", json=body)
        metrics = client.get("/metrics").text  # read twice: counted once
        assert "blipserve_out_of_memory_retries_total 1.0" in metrics
    finally:
        state.shutdown()
