"""The online path: concurrent requests through one engine, under deadlines.

What the HTTP routes call.  For each request: refuse at once when its rows cannot be
queued (before paying to fetch and decode them), prepare its rows on the engine's pool
under the request's deadline, refuse the request when any row is bad, queue the rows in
the :class:`~blipserve.engine.online_queue.OnlineQueue` (one model thread merges
compatible rows of concurrent requests), and return every prediction or the first
error.  A request that is cancelled (its client went away) drops its queued rows.

Nothing here knows HTTP: tests drive it with an engine and a plain event loop, and the
queue takes a clock.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from blipserve.engine.core import Engine
from blipserve.engine.online_queue import BatchObserver, BehindPolicy, OnlineQueue
from blipserve.engine.prepare import PreparedRow
from blipserve.engine.results import good_rows_or_raise, predictions_or_raise
from blipserve.engine.trace import RequestTrace
from blipserve.errors import DeadlineExceeded, InvalidRequest, RowError
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput, TextSink


class OnlineObserver(BatchObserver, Protocol):
    """Metrics hooks: the queue's, plus decoding time and bad images."""

    def decoded(self, seconds: float, bad_rows: int) -> None: ...


class OnlineEngine:
    """An engine with a queue in front of it, for requests that arrive concurrently."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_wait_s: float,
        max_queue: int,
        observer: OnlineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        behind: BehindPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer
        self.queue = OnlineQueue(
            engine.run_batch,
            max_batch_size=engine.max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            observer=observer,
            clock=clock,
            behind=behind,
        )

    def start(self) -> None:
        self.queue.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, stop the model thread, and close the engine."""
        self.queue.stop(timeout=timeout)
        self.engine.close()

    async def predict(
        self,
        rows: Sequence[RowInput],
        params: GenerationParams,
        deadline: float,
        sinks: Sequence[TextSink | None] = (),
        trace: RequestTrace | None = None,
    ) -> list[Prediction]:
        """Every row's prediction, in order, by ``deadline`` (the event loop's clock).

        ``sinks``: where each row's text goes in pieces as the model decodes it (called on
        the model thread; ``None`` or none given: the row does not stream).

        Raises ``InvalidRequest`` for parameters the model cannot honour, the bad row's
        :class:`RowError` (nothing is queued then), ``Overloaded`` when
        the queue is full, :class:`DeadlineExceeded`, or a batch's ``InferenceError``.
        """
        self.engine.check_params(params)
        if len(rows) > self.queue.max_queue:  # a 503 would be retried, and never fit
            raise InvalidRequest(
                f"the request has {len(rows)} rows; this server queues at most "
                f"{self.queue.max_queue} rows at once (--max-queue): send fewer a request"
            )
        # Rows that cannot be queued are refused before their images are fetched and decoded
        # (each decoded image can hold up to max_image_pixels x 3 bytes).
        self.queue.refuse_if_full(len(rows))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        prepare = self.engine.prepare
        try:
            async with asyncio.timeout_at(deadline):
                jobs = [
                    loop.run_in_executor(  # in the request's context: its logs carry its id
                        self.engine.decode_pool,
                        contextvars.copy_context().run,
                        functools.partial(prepare, row, params, trace=trace),
                    )
                    for row in rows
                ]
                outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed while its images were being fetched"
            ) from None
        prepared: list[PreparedRow | RowError] = []
        for outcome in outcomes:
            if isinstance(outcome, (PreparedRow, RowError)):
                prepared.append(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        if self.observer:
            bad = sum(isinstance(p, RowError) for p in prepared)
            self.observer.decoded(time.perf_counter() - started, bad)
        good = good_rows_or_raise(prepared)
        items = [p.item for p in good]
        for i, sink in enumerate(sinks):
            items[i] = dataclasses.replace(items[i], on_text=sink)
        results = await self.queue.run(
            [(item, p.key) for item, p in zip(items, good, strict=True)],
            timeout=max(0.0, deadline - loop.time()),
            trace=trace,
        )
        return predictions_or_raise(results)
