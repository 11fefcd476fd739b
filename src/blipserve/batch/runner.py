"""The batch job: stream rows -> read and decode in parallel -> engine batches -> durable
results.

Memory stays bounded: at most two chunks of rows are in flight (image files read by a pool
of reader threads, local or from an object store, and decoded ahead of the model while it
runs), whatever the input size.  Every finished chunk is journaled (on a writer thread,
while the model runs the next one: :class:`CommitBehind`), so a killed job resumes where it
stopped, redoing only the chunks it was running or committing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from blipserve.batch.book import JobBook
from blipserve.batch.capfilt import capfilt
from blipserve.batch.journal import OutputError
from blipserve.batch.options import BatchOptions, Summary, TooManyFailures
from blipserve.batch.rows import InputRow, RowResult
from blipserve.batch.storage import Location, StorageError
from blipserve.engine import Engine, PreparedRow
from blipserve.errors import ImageError, InvalidInput, RowError, quote
from blipserve.types import RowInput

log = logging.getLogger(__name__)
Chunk = TypeVar("Chunk")


class BatchJob:
    """Run ``engine`` over every row of ``options.input``: the rows a chunk at a time
    through the engine, and each chunk's results to the job's ``book`` (a
    :class:`~blipserve.batch.book.JobBook`: the journal, the progress, the outputs).

    ``filter_engine`` (an image-text matching model) turns on CapFilt: each generated
    caption, and each row's original text, gets a match probability and is kept when it
    reaches ``options.min_match``.  Once ``stop`` is set, the job stops at its next commit
    (:class:`~blipserve.errors.JobStopped`).  For example::

        with Engine.from_settings(settings) as engine:
            summary = BatchJob(engine, BatchOptions(input="photos/", output="out.csv")).run()
    """

    def __init__(
        self,
        engine: Engine,
        options: BatchOptions,
        filter_engine: Engine | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        engine.check_params(options.params)  # before the job's output is touched
        self.engine = engine
        self.filter_engine = filter_engine
        self.options = options
        filter_source = filter_engine.adapter.source if filter_engine else None
        self.book = JobBook(options, engine.adapter.source, filter_source, stop=stop)

    def run(self) -> Summary:
        try:
            with (
                contextlib.closing(
                    records_of(self.engine, self.todo(), self.options, self.filter_engine)
                ) as chunks,
                CommitBehind(self.commit) as committer,
            ):
                for results in chunks:
                    committer.submit(results)
        finally:
            self.close()
        return self.finish()

    # -- the book's steps, as run() takes them (bench/pipeline.py takes them itself) ---------

    def todo(self) -> Iterator[InputRow]:
        return self.book.todo()

    def commit(self, results: Sequence[RowResult]) -> None:
        self.book.commit(results)

    def close(self) -> None:
        self.book.close()

    def finish(self) -> Summary:
        return self.book.finish()


class CommitBehind(Generic[Chunk]):
    """Commits each chunk's records (``commit``: journal, fsync, sidecars, counts) on a
    thread of its own while the model runs the next chunk, one chunk behind at most.

    Committed on the job's thread, every chunk left the model idle while its records were
    written and fsync-ed: 1.4 ms a chunk of 64 rows here (median; p90 2.7 ms), 2-4% of a
    64 ms model call (1,000 images/s).  ``bench/pipeline.py`` (stand-in models of 64 ms a
    chunk, 5 interleaved pairs, 2 cores): committing on the job's thread ran at 0.96x this
    with 64x48 JPEGs, where decoding is not the limit; with 640x480 ones (decoding-bound
    here) 1.025x, and with a stand-in that holds the GIL 1.005-1.009x: within the noise.
    A small gain where the model is what is waited for, as on a GPU host with cores to
    decode on.  Kept (issue 33) for jobs whose journal is in an object store, where each
    commit is a PUT: with the output and journal in Azurite on loopback (the fastest PUTs
    a store gives), committing on the job's thread ran at 0.933x this (5 interleaved
    pairs, 0.91-0.97x; 64 ms chunks of 64 64x48 JPEGs: 696 vs 747 images/s) and at 1.01x
    with 16 ms chunks, where decoding limits both; on local disk 0.98x and 1.00x
    (``bench/pipeline.py --store azure``, bench/results/pipeline-*-cpu.json).
    Chunks are committed in order; a commit's error
    (``--max-failures`` exceeded, an unwritable output) stops the job at the next chunk,
    whose records are then dropped as a killed job's would be (resume runs them again).
    """

    def __init__(self, commit: Callable[[Chunk], None]) -> None:
        self._commit = commit
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blipserve-commit")
        self._pending: Future[None] | None = None

    def submit(self, chunk: Chunk) -> None:
        """Commit ``chunk`` once the previous chunk's commit is done (raising its error)."""
        self._wait()
        self._pending = self._writer.submit(self._commit, chunk)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> CommitBehind[Chunk]:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                self._wait()  # (its error is the job's)
        finally:
            # (the job failed: the chunk being committed is kept all the same, and the
            # job's own error is the one raised)
            self._writer.shutdown(wait=True)


def records_of(
    engine: Engine,
    rows: Iterable[InputRow],
    options: BatchOptions,
    filter_engine: Engine | None = None,
) -> Generator[list[RowResult], None, None]:
    """The results of ``rows``, a chunk (``options.chunk_rows``) at a time.

    The next chunk's images are read and decoded while the model runs this one: at most
    two chunks are in flight.  Shared by the local job and the Ray actors that read shards.
    """
    size = max(1, options.chunk_rows)
    window: deque[tuple[InputRow, Future[PreparedRow] | None]] = deque()
    starter = RowStarter(engine, options)
    try:
        for row in rows:
            window.append((row, starter.start(row)))
            if len(window) >= 2 * size:
                chunk = [window.popleft() for _ in range(size)]
                yield make_records(engine, chunk, options, filter_engine)
        while window:
            chunk = [window.popleft() for _ in range(min(size, len(window)))]
            yield make_records(engine, chunk, options, filter_engine)
    finally:
        for _, future in window:
            if future is not None:
                future.cancel()
        starter.close()


class RowStarter:
    """Starts each row's work: an image file is read by one of ``read_workers`` threads
    (a local disk or an object store: many reads in flight hide a store's latency), then
    decoded in the engine's pool; other rows (base64, http(s) URLs) go to the pool as
    they are.  Shared by the local job and the Ray actors."""

    def __init__(self, engine: Engine, options: BatchOptions) -> None:
        self.engine = engine
        self.options = options
        self._readers = ThreadPoolExecutor(
            max_workers=max(1, options.read_workers), thread_name_prefix="blipserve-read"
        )

    def start(self, row: InputRow) -> Future[PreparedRow] | None:
        """The future of the row's prepared input (None: the row itself is unreadable)."""
        if row.error:
            return None
        if row.path is None:  # the image came with the row: base64, a URL or a sample's bytes
            image = row.data if row.data is not None else row.image
            pool = self.engine.decode_pool
            return pool.submit(self.engine.prepare, self._input(row, image), self.options.params)
        return self._readers.submit(self._read_and_prepare, row, row.path)

    def _read_and_prepare(self, row: InputRow, path: str) -> PreparedRow:
        try:
            data = read_image_file(self.options.locate(path), self.engine.limits.max_image_bytes)
        except InvalidInput as exc:
            raise RowError(0, exc.message, row.id) from None
        item = self._input(row, data)
        return self.engine.decode_pool.submit(
            self.engine.prepare, item, self.options.params
        ).result()

    def _input(self, row: InputRow, image: str | bytes) -> RowInput:
        return RowInput(position=0, image=image, text=row.text or self.options.prompt, index=row.id)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)


def read_image_file(where: Location, limit: int) -> bytes:
    """An image file's bytes (at most ``limit``); a missing or unreadable file is this row's
    :class:`~blipserve.errors.ImageError`, an unreachable store a StorageError."""
    try:
        data = where.read_bytes(limit)
    except FileNotFoundError:
        raise ImageError(f"image file not found: '{where}'") from None
    except IsADirectoryError:
        raise ImageError(f"image path '{where}' is a directory, not a file") from None
    except OSError as exc:  # permissions, and anything else the local disk says of one file
        raise ImageError(f"cannot read image file '{where}': {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ImageError(
            f"image file '{where}' is more than the {limit} byte limit (max_image_bytes)"
        )
    return data


def make_records(
    engine: Engine,
    chunk: Sequence[tuple[InputRow, Future[PreparedRow] | None]],
    options: BatchOptions,
    filter_engine: Engine | None = None,
) -> list[RowResult]:
    """The results of rows started with :class:`RowStarter`; bad rows get errors.

    Shared by the local job and the Ray actors, so both record the same results.
    """
    prepared: list[PreparedRow | RowError] = []
    for row, future in chunk:
        if future is None:
            prepared.append(RowError(0, row.error or "unreadable row", row.id))
            continue
        try:
            prepared.append(future.result())
        except RowError as exc:
            prepared.append(exc)
        except StorageError:
            raise  # the store, not the row: stop (finished chunks are journaled)
        except Exception as exc:  # a bug must not lose the other rows
            log.exception("decoding %s failed", row.id)
            prepared.append(RowError(0, f"{type(exc).__name__}: {quote(str(exc))}", row.id))
    outcomes = engine.run_prepared(prepared)
    results = [
        RowResult.of(row, outcome) for (row, _), outcome in zip(chunk, outcomes, strict=True)
    ]
    if filter_engine:
        return capfilt(filter_engine, results, prepared, options.min_match)
    return results


__all__ = [
    "BatchJob",
    "BatchOptions",
    "CommitBehind",
    "JobBook",
    "OutputError",
    "RowStarter",
    "Summary",
    "TooManyFailures",
    "make_records",
    "records_of",
]
