"""Stand-ins that put the online path's timing in the test's hands: a model adapter whose
batches the test can hold, a clock that moves when told, and an event loop whose clock
does the same.

With them the queue, the online engine and the app's routes are tested by ordering
events (the model has started, a request's rows are queued), never by sleeping and
hoping.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Coroutine, Hashable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from fastapi import FastAPI

from blipserve.config import EngineConfig, ModelConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.errors import InferenceError, InvalidInput
from blipserve.models.optimize import BuildStep
from blipserve.models.protocol import TextRole
from blipserve.params import GenerationParams
from blipserve.server.app import ServerState, create_app
from blipserve.types import ModelInput, Prediction

T = TypeVar("T")
HOLD_AT_MOST_S = 10  # a test that forgets to open the gate fails, rather than hangs


class EchoAdapter:
    """A model adapter (:class:`~blipserve.models.base.Adapter`) with no model behind it.

    Each row's prediction is ``echo <text>``; every batch is recorded in ``batches``; a
    batch holding the text ``boom`` fails.  :meth:`hold` makes the next batch wait for
    :meth:`release` (``started`` is set once a batch has begun), so a test can keep the
    model busy while it queues rows behind it.
    """

    kind: ClassVar[str] = "echo"
    text_role: ClassVar[TextRole] = "prompt"
    text_required: ClassVar[bool] = False
    image_size = 8
    device = torch.device("cpu")
    dtype = torch.float32
    source = "echo"
    vision_backend = "torch"
    static_cache = False
    build: tuple[BuildStep, ...] = (BuildStep("echo", "python"),)

    def __init__(self) -> None:
        self.batches: list[list[str | None]] = []
        self.started = threading.Event()
        self._gate = threading.Event()
        self._gate.set()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def texts(self) -> list[str | None]:
        """Every row the model has run, in order."""
        return [text for batch in self.batches for text in batch]

    def check_row(self, item: ModelInput) -> None:
        self.check_params(item.params)

    def batch_key(self, item: ModelInput) -> Hashable:
        return item.text == "boom"  # a failing row gets a batch of its own

    def check_params(self, params: GenerationParams) -> None:
        if (params.num_return_sequences or 1) > 1:
            raise InvalidInput("the echo model gives one text per row")

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        self.started.set()
        self._gate.wait(HOLD_AT_MOST_S)
        texts = [i.text for i in items]
        self.batches.append(texts)
        if "boom" in texts:
            raise InferenceError("the model failed on this batch: boom")
        return [Prediction(f"echo {t}", tokens=2) for t in texts]

    def question_prompt(self, question: str) -> str:
        return question

    def chat_prompt(self, question: str | None, history: Sequence[tuple[str, str]]) -> str | None:
        return question

    def count_tokens(self, text: str | None) -> int:
        return len(text.split()) if text else 0

    @property
    def default_max_new_tokens(self) -> int:
        return 20


class FakeClock:
    """A monotonic clock (the online queue's ``clock=``) that moves only by :meth:`advance`.

    It also tells when another thread (the queue's model thread) has read it:
    :meth:`wait_until_read_at` returns once that thread has looked at the queue with the
    clock at a given time, and so has decided whether a batch is due then.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._owner = threading.get_ident()  # the test's own thread
        self._read_elsewhere = -math.inf  # the latest time another thread read
        self._reads = threading.Condition()

    def __call__(self) -> float:
        with self._reads:
            if threading.get_ident() != self._owner:
                self._read_elsewhere = max(self._read_elsewhere, self.now)
                self._reads.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._reads:
            self.now += seconds

    def wait_until_read_at(self, at: float, timeout: float = HOLD_AT_MOST_S) -> None:
        with self._reads:
            if not self._reads.wait_for(lambda: self._read_elsewhere >= at, timeout):
                raise AssertionError(f"no other thread read the clock at {at} s")


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` moves only by :meth:`advance`: deadlines on the
    loop's clock (``asyncio.timeout_at``) pass when the test says, after no real time.

    Run a coroutine on it with :func:`run_on_virtual_time`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    @staticmethod
    def running() -> VirtualTimeLoop:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop), "run this on run_on_virtual_time"
        return loop


def run_on_virtual_time(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)


def state_of(app: FastAPI) -> ServerState:
    """What an app's routes share (its engine, readiness, metrics)."""
    state = app.state.blipserve
    assert isinstance(state, ServerState)
    return state


class EchoApps:
    """Apps (``create_app``) over one echo model, as the route tests make them: server
    settings from ``defaults`` and each call's own, loaded by hand unless ``load`` is false;
    :meth:`close` releases the model and stops every app's queue."""

    def __init__(self, model: EchoAdapter, name: str, **defaults: Any) -> None:
        self.model, self.name, self.defaults = model, name, defaults
        self.apps: list[FastAPI] = []

    def make(self, load: bool = True, name: str | None = None, **server: Any) -> FastAPI:
        config = ServerConfig(**{**self.defaults, **server})
        app = create_app(Settings(model=ModelConfig(model=name or self.name), server=config))
        if load:
            engine = Engine(self.model, config=EngineConfig(max_batch_size=4))
            state_of(app).load(engine)
        self.apps.append(app)
        return app

    def close(self) -> None:
        self.model.release()
        for app in self.apps:
            state_of(app).shutdown()
