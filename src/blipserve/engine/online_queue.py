"""Stage 2 online: the queue that merges rows of concurrent requests into model batches.

(Its offline counterpart, for a list of rows known at once, is
:mod:`blipserve.engine.offline_plan`.)

Rows from every request go into one bounded queue.  A single model thread takes the oldest
row, waits up to ``max_wait_s`` (from that row's arrival) for more rows with the same batch
key, and runs up to ``max_batch_size`` of them in one model call.  Results go back to each
request's asyncio futures through ``call_soon_threadsafe``, so the event loop never blocks on
inference.  Rows whose request gave up (deadline, disconnect) are dropped before they reach
the model.

Batch jobs the server hosts queue their batches *behind* these rows (:meth:`run_behind`):
the same model thread runs a job's rows only when no request's rows wait, so a request
never waits for more than the model call already running.  While requests keep coming
(one in the last ``quiet_s``), a job's calls shrink to ``behind_rows`` rows and take at
most ``behind_share`` of the thread's time, so most requests find the model free; when
requests stop, a job's calls grow back to full batches.

The class knows nothing of HTTP: tests drive it with a fake ``run_batch`` and a plain
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from blipserve.engine.trace import RequestTrace
from blipserve.errors import (
    BlipserveError,
    DeadlineExceeded,
    InferenceError,
    JobStopped,
    Overloaded,
)
from blipserve.types import ModelInput, Prediction

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[ModelInput]], list[Prediction]]
Result = Prediction | BlipserveError


class BatchObserver(Protocol):
    """Hooks for metrics; every method is called on the model thread."""

    def queue_depth(self, rows: int) -> None: ...
    def batch_done(self, size: int, queue_waits_s: Sequence[float], model_s: float) -> None: ...


@dataclass(eq=False)
class _Pending:
    item: ModelInput
    key: Hashable
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    enqueued: float
    trace: RequestTrace | None = None
    # Set from the event loop when the request gives up; read by the model thread.
    abandoned: bool = field(default=False)

    def resolve(self, result: Result) -> None:
        def settle() -> None:
            if not self.future.done():
                self.future.set_result(result)

        # RuntimeError: the loop has closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(settle)


@dataclass(eq=False)
class _Behind:
    """A batch job's rows waiting behind the requests' (run a slice at a time)."""

    items: Sequence[ModelInput]
    future: concurrent.futures.Future[list[Result]]
    results: list[Result] = field(default_factory=list)


@dataclass(frozen=True)
class BehindPolicy:
    """How a hosted batch job shares the model thread with requests: while requests come
    (one in the last ``quiet_s`` seconds), calls of ``rows`` rows taking at most ``share``
    of the thread's time; otherwise calls of a full batch back to back."""

    rows: int = 1
    share: float = 0.1
    quiet_s: float = 10.0


class OnlineQueue:
    """Merge rows of concurrent requests into model batches of compatible rows."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        behind: BehindPolicy | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._observer = observer
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.behind = behind or BehindPolicy()
        self._behind: deque[_Behind] = deque()
        self._last_request = -float("inf")  # when the last request's rows came or ran
        self._behind_until = -float("inf")  # no job rows before this (their share is used)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="blipserve-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the model thread is running (started, not stopped, not dead)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def wake(self) -> None:
        """Have the model thread look at the queue again now.

        Only a ``clock`` that jumps needs this (a test's fake clock): between arrivals the
        thread sleeps until the oldest row is due by its last reading of the clock.
        """
        with self._cond:
            self._cond.notify_all()

    # -- the event-loop side --------------------------------------------------------------

    async def run(
        self,
        items: Sequence[tuple[ModelInput, Hashable]],
        *,
        timeout: float | None,
        trace: RequestTrace | None = None,
    ) -> list[Result]:
        """Queue ``(item, batch key)`` rows and wait for their results, in order.

        Raises :class:`Overloaded` at once when the rows do not fit in the queue, and
        :class:`DeadlineExceeded` after ``timeout`` seconds (queued rows are dropped).  If
        the awaiting task is cancelled (client gone), its queued rows are dropped too.
        """
        loop = asyncio.get_running_loop()
        now = self._clock()
        pending = [
            _Pending(item, key, loop.create_future(), loop, now, trace) for item, key in items
        ]
        if trace is not None:
            trace.queued()
        with self._cond:
            self.refuse_if_full(len(pending))
            self._queue.extend(pending)
            self._last_request = now
            self._cond.notify_all()
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*(p.future for p in pending)))
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its deadline of {timeout:.3g} s"
            ) from None
        finally:
            # On success every future is done and these rows have left the queue; on a
            # timeout or cancellation (gather has cancelled the futures already) this tells
            # the model thread to skip rows nobody waits for.
            for p in pending:
                p.abandoned = True
                p.future.cancel()

    def refuse_if_full(self, rows: int) -> None:
        """Raise :class:`Overloaded` if ``rows`` more rows do not fit in the queue now.

        :meth:`run` checks this under its lock; callers may check early (before paying to
        decode images) for rows that would be refused anyway.
        """
        if self._stopping:
            raise Overloaded("the server is shutting down", retry_after_s=5)
        if len(self._queue) + rows > self.max_queue:
            raise Overloaded(
                f"the queue is full ({len(self._queue)} of {self.max_queue} rows waiting); "
                "retry shortly"
            )

    # -- a batch job's side (any thread but the event loop's) ------------------------------

    def run_behind(
        self, items: Sequence[ModelInput], cancelled: threading.Event | None = None
    ) -> list[Result]:
        """Run rows that share a batch key behind the requests' rows; block until done.

        Results in order (a failed call's rows get its error).  Raises :class:`JobStopped`
        when the queue stops or once ``cancelled`` is set (rows not run yet are dropped).
        """
        if not items:
            return []
        work = _Behind(items, concurrent.futures.Future())
        with self._cond:
            if self._stopping:
                raise JobStopped("the server is stopping")
            self._behind.append(work)
            self._cond.notify_all()
        while True:
            try:
                return work.future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                if not self.alive:  # (the model thread is gone: nobody will run them)
                    raise JobStopped("the model thread is not running") from None
                if cancelled is not None and cancelled.is_set():
                    with self._cond:
                        if work in self._behind:
                            self._behind.remove(work)
                    raise JobStopped("the job was stopped") from None

    def _behind_slice(self, now: float) -> tuple[_Behind, Sequence[ModelInput]] | None:
        """The job rows to run now, if any may (called under the lock, no request waiting)."""
        if not self._behind or now < self._behind_until:
            return None
        work = self._behind[0]
        busy = now - self._last_request < self.behind.quiet_s
        size = max(1, self.behind.rows) if busy else self.max_batch_size
        start = len(work.results)
        return work, work.items[start : start + size]

    # -- the model thread -----------------------------------------------------------------

    def _next_batch(self) -> list[_Pending] | tuple[_Behind, Sequence[ModelInput]] | None:
        """Block until a batch is due (a request's rows first, else a job's); ``None`` once
        stopping with an empty queue."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].abandoned:
                    self._queue.popleft()
                if not self._queue:
                    if self._stopping:
                        return None
                    now = self._clock()
                    if (job_rows := self._behind_slice(now)) is not None:
                        return job_rows
                    if self._behind:  # the job's share of a busy model is used up
                        self._cond.wait(max(0.001, self._behind_until - now))
                    else:
                        self._cond.wait()
                    continue
                first = self._queue[0]
                same = [p for p in self._queue if p.key == first.key and not p.abandoned]
                due = first.enqueued + self.max_wait_s - self._clock()
                if len(same) >= self.max_batch_size or due <= 0 or self._stopping:
                    batch = same[: self.max_batch_size]
                    taken = {id(p) for p in batch}
                    self._queue = deque(p for p in self._queue if id(p) not in taken)
                    return batch
                self._cond.wait(due)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if isinstance(batch, tuple):
                self._run_behind(*batch)
                continue
            if self._observer:
                self._observer.queue_depth(len(self._queue))
            started, started_ns = self._clock(), time.time_ns()
            try:
                results: Sequence[Result] = self._run_batch([p.item for p in batch])
            except BlipserveError as exc:
                results = [exc] * len(batch)
            except Exception as exc:  # never let the model thread die
                log.exception("batch of %d rows failed", len(batch))
                results = [InferenceError(f"the model failed on this batch: {exc}")] * len(batch)
            model_s = self._clock() - started
            _record_traces(batch, started_ns, time.time_ns())
            for p, result in zip(batch, results, strict=True):
                p.resolve(result)
            with self._cond:
                self._last_request = self._clock()
            if self._observer:
                waits = [started - p.enqueued for p in batch]
                self._observer.batch_done(len(batch), waits, model_s)
        with self._cond:  # stopped: jobs waiting behind get an answer
            left, self._behind = list(self._behind), deque()
        for work in left:
            work.future.set_exception(JobStopped("the server is stopping"))

    def _run_behind(self, work: _Behind, items: Sequence[ModelInput]) -> None:
        """One call on a job's rows; the job's turn ends when its share is used."""
        started = self._clock()
        try:
            results: Sequence[Result] = self._run_batch(items)
        except BlipserveError as exc:
            results = [exc] * len(items)
        except Exception as exc:  # never let the model thread die
            log.exception("a batch job's call of %d rows failed", len(items))
            results = [InferenceError(f"the model failed on this batch: {exc}")] * len(items)
        ended = self._clock()
        work.results.extend(results)
        with self._cond:
            if ended - self._last_request < self.behind.quiet_s:
                share = min(max(self.behind.share, 0.01), 1.0)
                self._behind_until = ended + (ended - started) * (1 - share) / share
            if len(work.results) >= len(work.items):
                if self._behind and self._behind[0] is work:
                    self._behind.popleft()
                work.future.set_result(list(work.results))


def _record_traces(batch: Sequence[_Pending], start_ns: int, end_ns: int) -> None:
    """Tell each traced request of ``batch`` when its rows waited and ran."""
    traced = Counter(p.trace for p in batch if p.trace is not None)
    for trace, rows in traced.items():
        trace.ran(start_ns, end_ns, rows, len(batch))
