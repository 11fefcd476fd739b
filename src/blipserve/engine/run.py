"""Stage 3 of the request path: batches of prepared rows through the model adapter.

:class:`ModelRunner` runs one compatible batch under ``torch.inference_mode`` (a model
failure fails that batch's rows only; out of memory, the same rows again in smaller calls,
:mod:`blipserve.engine.batch_size`), and, for calls that hold several batches (batch
jobs, the CLI), runs up to ``model_workers`` of them at once on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from blipserve.engine.batch_size import BatchSizer, SentOnce, release_memory
from blipserve.engine.offline_plan import plan_batches
from blipserve.engine.prepare import PreparedRow
from blipserve.errors import BlipserveError, InferenceError, RowError
from blipserve.models.protocol import Adapter
from blipserve.types import ModelInput, Outcome, Prediction

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs batches on ``adapter``; at most ``model_workers`` at once."""

    def __init__(
        self, adapter: Adapter, *, max_batch_size: int, model_workers: int, torch_threads: int
    ) -> None:
        self.adapter = adapter
        self.max_batch_size = max_batch_size
        self.model_workers = model_workers
        self.torch_threads = torch_threads
        self.sizer = BatchSizer(max_batch_size)
        # At most model_workers batches at once (inference keeps no state in the model, and
        # int8 scratch buffers are per thread), sharing the torch threads while they overlap.
        self._slots = threading.BoundedSemaphore(model_workers)
        self._busy_lock = threading.Lock()
        self._helpers_active = 0  # helper threads of run_prepared taking batches now
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, model_workers - 1), thread_name_prefix="blipserve-model"
        )

    @contextlib.contextmanager
    def _slot(self, helper: bool) -> Iterator[None]:
        """Wait for a free model slot; run with this thread's share of the torch threads.

        torch's intra-op thread count is per calling thread (OpenMP's).  Helpers (the
        extra model workers of :meth:`run_prepared`) always run on one: a thread that has
        run a parallel region keeps its OpenMP team, and once a process holds more team
        threads than cores, libgomp stops spinning at barriers for every team -- one image
        on its own then took 0.85 s instead of 0.6 s, for the same CPU time.  The calling
        thread takes what the busy helpers leave.
        """
        with self._slots:
            with self._busy_lock:
                share = 1 if helper else max(1, self.torch_threads - self._helpers_active)
            before = torch.get_num_threads()
            if self.model_workers > 1 and before != share:
                torch.set_num_threads(share)
            try:
                yield
            finally:
                if torch.get_num_threads() != before:  # (the caller's thread, as it was)
                    torch.set_num_threads(before)

    def run_batch(self, items: Sequence[ModelInput], *, helper: bool = False) -> list[Prediction]:
        """Run rows that share a batch key; raise :class:`InferenceError` if the model fails.

        Rows go to the model in calls of at most the size that fits in memory for their
        generation settings (:class:`~blipserve.engine.batch_size.BatchSizer`); a call that
        runs out of memory is run again in smaller ones.  Safe to call from several threads:
        at most ``model_workers`` calls run at once (``helper``: on one torch thread, see
        :meth:`_slot`).
        """
        shape = items[0].params if items else None  # rows of a batch share them
        # A streamed row that runs again sends each piece of its text once.
        sinks = [SentOnce(item.on_text) if item.on_text else None for item in items]
        items = [
            dataclasses.replace(item, on_text=sink) if sink else item
            for item, sink in zip(items, sinks, strict=True)
        ]
        predictions: list[Prediction] = []
        while len(predictions) < len(items):
            size = self.sizer.limit(shape)
            start = len(predictions)
            call = items[start : start + size]
            answers = self._predict(call, helper)
            if answers is None:
                release_memory(self.adapter.device)
                self.sizer.out_of_memory(shape, len(call))  # (raises when one row is too many)
                for sink in sinks[start : start + size]:
                    if sink:
                        sink.again()
                continue
            self.sizer.fitted(shape, len(call))
            predictions += answers
        return predictions

    def _predict(self, items: Sequence[ModelInput], helper: bool) -> list[Prediction] | None:
        """One model call; ``None`` when it ran out of memory (the error, and the tensors
        its frames hold, are gone by the time this returns)."""
        with self._slot(helper), torch.inference_mode():
            try:
                predictions = self.adapter.predict(items)
            except torch.OutOfMemoryError:
                return None
            except BlipserveError:
                raise
            except Exception as exc:
                log.exception("model failed on a batch of %d rows", len(items))
                raise InferenceError(f"the model failed on this batch: {exc}") from exc
        if len(predictions) != len(items):
            raise InferenceError(
                f"the model returned {len(predictions)} results for {len(items)} rows"
            )
        return predictions

    def run_prepared(self, prepared: Sequence[PreparedRow | RowError]) -> list[Outcome]:
        """Batch the good rows by key, run them, and return outcomes in input order.

        A failing batch fails only its own rows, each with the :class:`InferenceError`.
        """
        outcomes: dict[int, Outcome] = {
            i: p for i, p in enumerate(prepared) if isinstance(p, RowError)
        }
        good = [(i, p) for i, p in enumerate(prepared) if isinstance(p, PreparedRow)]
        batches = [
            [good[j] for j in batch]
            for batch in plan_batches([p.key for _, p in good], self.max_batch_size)
        ]

        todo = deque(batches)
        taking = threading.Lock()

        def drain(helper: bool) -> None:
            # This thread takes the next batch until none is left.
            try:
                while True:
                    with taking:
                        if not todo:
                            return
                        members = todo.popleft()
                    try:
                        results: Sequence[Outcome] = self.run_batch(
                            [p.item for _, p in members], helper=helper
                        )
                    except InferenceError as exc:
                        results = [exc] * len(members)
                    for (i, _), result in zip(members, results, strict=True):
                        outcomes[i] = result
            finally:
                if helper:
                    with self._busy_lock:
                        self._helpers_active -= 1

        # Extra model workers join in when there is more than one batch; the caller's
        # thread works too, on the torch threads they leave.
        helpers = max(0, min(self.model_workers, len(batches)) - 1)
        with self._busy_lock:  # counted from now, so that the caller leaves them threads
            self._helpers_active += helpers
        futures = [self._pool.submit(drain, True) for _ in range(helpers)]
        drain(False)
        for future in futures:
            future.result()
        return [outcomes[i] for i in range(len(prepared))]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def default_model_workers(device: torch.device, torch_threads: int, vision: str = "torch") -> int:
    """Batches run at once when the config leaves it to us (``model_workers`` 0).

    Measured on BLIP-base int8, 2-core Zen 4: two batches of 8 on two threads with one
    torch thread each against one after the other with two threads, images/s (medians of
    7 interleaved pairs, three runs): +13%, +3% and +9%, captions identical.  A GPU
    runs one batch at a time (CUDA graphs and the memory of two batches in flight).  So
    does a vision encoder on OpenVINO, which takes every core per call whatever the
    thread's torch share: with two workers, batch 8, 1.73 images/s against 2.06-2.24 with
    one (bench/results/speed-cpu-openvino.json, -w1.json).
    """
    if device.type != "cpu" or torch_threads < 2 or vision == "openvino":
        return 1
    return 2


def default_decode_workers(device: torch.device, cores: int | None = None) -> int:
    """Threads fetching and decoding images when the config leaves it to us
    (``decode_workers`` 0), given the usable ``cores`` (default: :func:`usable_cores`).

    With the model on a CPU, 4: the model needs the cores, and decoding is a small share of
    a row's time there.  With the model on a GPU the cores are free for decoding, which
    must keep up with it: a 640x480 JPEG takes about 1.8 ms on one thread here, and
    threads scale (Pillow releases the GIL while it decodes): 64 such JPEGs decoded at 567
    images/s on one thread, 954 on two, 1028 on four, on this 2-core machine (medians of 5
    interleaved passes).  BLIP-base's 1,000 images/s on an H200 then needs at least two
    cores' worth, so one thread per core, 4 to 16 (how far threads scale past 2 cores is
    not measured yet: issue 22).
    """
    if device.type == "cpu":
        return 4
    return max(4, min(16, usable_cores() if cores is None else cores))


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: those it may run on, fewer where a container's CPU
    quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) allows less."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cores = cores or os.cpu_count() or 1
    root = Path(cgroup)
    for files in (["cpu.max"], ["cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"]):
        try:
            fields = " ".join((root / name).read_text() for name in files).split()
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # (no such file, or "max": no quota)
        if quota > 0 and period > 0:
            return max(1, min(cores, -(-quota // period)))
    return cores


def default_batch_size(device: torch.device) -> int:
    """Rows per model call when the config leaves it to us (``max_batch_size`` 0).

    Measured (docs/performance.md): on a 2-core CPU batching pays little past 8 rows; on an
    H200 BLIP-base gave 6.7x the one-by-one throughput at 8 rows, 14.8x at 32 and 20.7x at
    64, with 2 GiB of GPU memory at 64, and BLIP-2 OPT-2.7b with --cuda-graphs ran at 64.
    A GPU with less memory free halves it where it must (:mod:`~blipserve.engine.batch_size`).
    """
    return 64 if device.type == "cuda" else 8
