"""The server's engine as a hosted batch job uses it: behind the requests.

A job is ``blipserve batch``'s own :class:`~blipserve.batch.runner.BatchJob`; only its
engine differs.  Its model calls go to the online queue's model thread, which runs them
when no request's rows wait (:meth:`~blipserve.engine.online_queue.OnlineQueue.run_behind`):
one thread runs the model, so a request waits at most for the call already running, and
no second thread that ran the model lingers (one that does slows the model thread here,
see :mod:`blipserve.server.app`).  Its images are decoded on threads of its own, so a
job's chunk of decoding never queues in front of a request's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from blipserve.engine import Engine, PreparedRow
from blipserve.engine.offline_plan import plan_batches
from blipserve.engine.online_queue import OnlineQueue
from blipserve.errors import InferenceError, RowError
from blipserve.types import Outcome, Prediction


class BehindRequests(Engine):
    """``engine`` for one job: same model, adapter and limits; model calls behind the
    requests on ``queue``; stops (:class:`~blipserve.errors.JobStopped`) once ``stop`` is
    set."""

    def __init__(
        self, engine: Engine, queue: OnlineQueue, stop: threading.Event, decode_workers: int = 2
    ) -> None:
        # (not Engine.__init__: the model, its runner and its pools are the server's)
        vars(self).update(vars(engine))
        self.queue = queue
        self.stop = stop
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, decode_workers), thread_name_prefix="blipserve-job-decode"
        )

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        return self._pool

    def run_prepared(self, prepared: Sequence[PreparedRow | RowError]) -> list[Outcome]:
        """Plan the good rows into batches (as the engine does) and run each behind the
        requests; outcomes in order."""
        outcomes: dict[int, Outcome] = {
            i: p for i, p in enumerate(prepared) if isinstance(p, RowError)
        }
        good = [(i, p) for i, p in enumerate(prepared) if isinstance(p, PreparedRow)]
        for batch in plan_batches([p.key for _, p in good], self.max_batch_size):
            members = [good[j] for j in batch]
            results = self.queue.run_behind([p.item for _, p in members], self.stop)
            for (i, _), result in zip(members, results, strict=True):
                outcomes[i] = result if isinstance(result, Prediction) else _row_error(result)
        return [outcomes[i] for i in range(len(prepared))]

    def close(self) -> None:
        """Only the job's own threads: the model is the server's."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _row_error(error: Exception) -> Outcome:
    if isinstance(error, (RowError, InferenceError)):
        return error
    return InferenceError(getattr(error, "message", str(error)))


__all__ = ["BehindRequests"]
