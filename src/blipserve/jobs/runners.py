"""Where a hosted job's rows run: on the server's engine behind the requests, or on a Ray
cluster (``--jobs-on-ray``) as ``blipserve batch --ray`` runs them."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from blipserve.batch.book import JobBook
from blipserve.batch.options import BatchOptions, Summary
from blipserve.config import Settings
from blipserve.engine import Engine
from blipserve.engine.online_queue import OnlineQueue
from blipserve.jobs.behind import BehindRequests
from blipserve.jobs.worker import RunJob


def on_engine(engine: Engine, queue: OnlineQueue) -> RunJob:
    """Jobs as :class:`~blipserve.batch.runner.BatchJob` on ``engine``, behind ``queue``'s
    requests."""
    from blipserve.batch.runner import BatchJob

    def run(
        options: BatchOptions, stop: threading.Event, running: Callable[[JobBook | None], None]
    ) -> Summary:
        shared = BehindRequests(engine, queue, stop)
        try:
            job = BatchJob(shared, options, stop=stop)
            running(job.book)
            return job.run()
        finally:
            shared.close()

    return run


def on_ray(settings: Settings) -> RunJob:
    """Jobs as ``blipserve batch --ray`` runs them, on ``--jobs-on-ray``'s cluster."""
    from blipserve.batch.ray import run_on_ray

    address = settings.jobs.jobs_on_ray
    ray = dataclasses.replace(
        settings.ray, ray=True, ray_address=None if address == "local" else address
    )
    on_cluster = dataclasses.replace(settings, ray=ray)

    def run(
        options: BatchOptions, stop: threading.Event, running: Callable[[JobBook | None], None]
    ) -> Summary:
        running(None)  # (Ray's driver keeps the counts: the record has them at the end)
        return run_on_ray(options, on_cluster, stop)

    return run


__all__ = ["on_engine", "on_ray"]
