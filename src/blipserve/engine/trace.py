"""When each stage of one request ran: what a request's trace is made of.

The engine's threads record wall-clock intervals here as they work on a request's rows
(fetching an image, decoding it, waiting in the queue, the model call that ran it); the
server turns them into OpenTelemetry spans (:mod:`blipserve.server.tracing`) once the
request is answered.  Nothing here knows OpenTelemetry, and a request without a trace
costs nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Interval:
    """One stage of a request: ``name`` from ``start_ns`` to ``end_ns`` (``time.time_ns``)."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


class RequestTrace:
    """The intervals of one request, recorded from any thread.

    Stages: ``fetch`` (an image URL's download), ``decode`` (bytes to a checked image),
    ``queue`` (a row's wait for its batch), ``model`` (the call that ran its batch: several
    rows of this request in one batch share one).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intervals: list[Interval] = []
        self.queued_ns: int | None = None

    def record(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        with self._lock:
            self._intervals.append(Interval(name, start_ns, end_ns, attributes))

    def queued(self) -> None:
        """The request's rows join the queue now."""
        self.queued_ns = time.time_ns()

    def ran(self, start_ns: int, end_ns: int, rows: int, batch_rows: int) -> None:
        """A model call ran ``rows`` of this request in a batch of ``batch_rows``."""
        if self.queued_ns is not None:
            self.record("queue", self.queued_ns, start_ns, rows=rows)
        self.record("model", start_ns, end_ns, rows=rows, batch_rows=batch_rows)

    def intervals(self) -> list[Interval]:
        with self._lock:
            return sorted(self._intervals, key=lambda i: (i.start_ns, i.name))
