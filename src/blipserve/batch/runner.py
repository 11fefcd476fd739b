"""The batch job: stream rows -> read and decode in parallel -> engine batches -> durable
results.

Memory stays bounded: at most two chunks of rows are in flight (image files read by a pool
of reader threads, local or from an object store, and decoded ahead of the model while it
runs), whatever the input size.  Every finished chunk is journaled before the next one
starts, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blipserve.batch.journal import JobJournal, OutputError, Record, open_journal
from blipserve.batch.sinks import (
    caption_to_keep,
    infer_format,
    sidecar_path,
    write_output,
    write_sidecar,
)
from blipserve.batch.sources import InputRow, count_rows, iter_rows
from blipserve.batch.storage import Location, StorageError, locate
from blipserve.contract import Prediction, RowInput
from blipserve.engine import Engine, PreparedRow
from blipserve.errors import BlipserveError, ImageError, InvalidInput, RowError, quote
from blipserve.models.base import ModelInput
from blipserve.params import GenerationParams

log = logging.getLogger(__name__)


class TooManyFailures(BlipserveError):
    """More rows failed than ``--max-failures`` allows: the job stopped (what is done is
    kept in the journal; a rerun resumes)."""


@dataclass(frozen=True)
class FailureLimit:
    """``--max-failures``: ``N`` rows, or ``N%`` of the rows this run attempts (the catalog's
    ``error_threshold``).  Exceeding it stops the job with an error."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> FailureLimit | None:
        if text is None or not text.strip():
            return None
        value = text.strip()
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError
                return cls(percent=percent)
            count = int(value)
            if count < 0:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise InvalidInput(
                "--max-failures wants a number of rows (10) or a percentage (1%), "
                f"got {quote(value)}"
            ) from None

    def exceeded(self, failed: int, attempted: int, bound: int | None = None) -> bool:
        """Whether ``failed`` of ``attempted`` rows break the limit.  A percentage is judged
        on the whole run (``attempted`` at its end), or early against ``bound``, a number
        of rows the run cannot exceed (the input's, when it is known)."""
        if self.count is not None:
            return failed > self.count
        assert self.percent is not None
        of = attempted if bound is None else bound
        return failed > self.percent / 100 * of

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


@dataclass(frozen=True)
class BatchOptions:
    """One batch job.  ``input``/``output`` are local paths or object-store URLs;
    ``storage_options`` (credentials among them) go to the stores' filesystems only."""

    input: str | os.PathLike[str]
    output: str | os.PathLike[str] | None = None
    format: str | None = None
    sidecar: str | None = None
    overwrite: bool = False
    retry_errors: bool = False
    params: GenerationParams = field(default_factory=GenerationParams)
    prompt: str | None = None  # text for rows that have none (a question for a whole folder)
    min_match: float = 0.5
    chunk_rows: int = 32
    progress: bool | None = None  # None: a bar on a TTY, log lines otherwise
    log_every_s: float = 10.0
    max_failures: FailureLimit | None = None
    read_workers: int = 16  # image files read at once (object stores want many in flight)
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def locate(self, where: str | os.PathLike[str]) -> Location:
        return locate(where, self.storage_options)


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    written: int | None = None

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        return (
            f"done {self.done}, failed {self.failed}, skipped {self.skipped}, "
            f"elapsed {self.elapsed_s:.1f} s, {self.images_per_s:.2f} images/s"
        )


class JobBook:
    """The driver's side of a batch job, wherever its rows run (here, or on Ray).

    It opens the journal (so a job resumes, and local and Ray runs resume each other),
    yields the rows still to do, records finished rows (journal, sidecars, counts) and
    writes the final output.  ``model_source`` and ``filter_source`` identify the models.
    """

    def __init__(
        self, options: BatchOptions, model_source: str, filter_source: str | None = None
    ) -> None:
        if options.output is None and options.sidecar is None:
            raise InvalidInput("nothing to write: give --output, --sidecar, or both")
        self.options = options
        self.model_source = model_source
        self.filter_source = filter_source
        self.input = options.locate(options.input)
        self.output = options.locate(options.output) if options.output is not None else None
        self.format = infer_format(self.output, options.format) if self.output else None
        self.journal: JobJournal | None = (
            open_journal(self.output, self.signature()) if self.output else None
        )
        self.summary = Summary()
        self._started = time.monotonic()
        self._progress: _Progress | None = None
        self._total: int | None = None  # the input's rows, where cheap to know
        self._kept_sidecars: set[str] = set()  # images whose caption file was there already

    def signature(self) -> dict[str, Any]:
        """What identifies this job's results: a rerun with another signature is refused.
        (Locations as absolute paths or URLs: the same job from any working directory.)"""
        o = self.options
        return {
            "input": str(self.input),
            "model": self.model_source,
            "params": o.params.generate_kwargs(),
            "prompt": o.prompt,
            "filter": self.filter_source,
            "min_match": o.min_match if self.filter_source else None,
        }

    def todo(self) -> Iterator[InputRow]:
        """Open the journal; yield the input rows not done yet (the rest count as skipped)."""
        o = self.options
        self._started = time.monotonic()
        done = self.journal.open(overwrite=o.overwrite) if self.journal else {}
        self._total = count_rows(self.input)
        self._progress = _Progress(self._total, o.progress, o.log_every_s, self.summary)
        for row in iter_rows(self.input, exclude=self._written(), sidecar=o.sidecar):
            if self._skip(row, done):
                self.summary.skipped += 1
                self._progress.update(1)
            else:
                yield row

    def _written(self) -> frozenset[str]:
        """What this job writes, which is never one of its inputs."""
        if self.output is None:
            return frozenset()
        out = self.output
        return frozenset({str(out), str(out.with_name(f".{out.name}.tmp"))})

    def _skip(self, row: InputRow, done: dict[str, bool]) -> bool:
        if row.id in done and (done[row.id] or not self.options.retry_errors):
            return True
        o = self.options
        if o.sidecar and row.path and row.has_sidecar and not o.overwrite:
            # An existing caption file is left alone (and is the record for sidecar-only jobs).
            self._kept_sidecars.add(row.path)
            return self.journal is None
        return False

    def commit(self, records: Sequence[Record]) -> None:
        """Record finished rows: journal (durably), sidecars, counts, progress."""
        if self.journal:
            self.journal.append(records)
        for record in records:
            self._write_sidecar(record)
            if record["error"]:
                self.summary.failed += 1
                log.warning("%s: %s", record["id"], record["error"])
            else:
                self.summary.done += 1
        if self._progress:
            self._progress.update(len(records))
        limit, s = self.options.max_failures, self.summary
        # a percentage is judged early only against a known input size, else at the end
        judged = limit is not None and (limit.count is not None or self._total is not None)
        if limit and judged and limit.exceeded(s.failed, s.done + s.failed, self._total):
            raise self._too_many(limit)

    def _too_many(self, limit: FailureLimit) -> TooManyFailures:
        s = self.summary
        return TooManyFailures(
            f"{s.failed} of {s.done + s.failed} rows failed, more than --max-failures {limit}; "
            "the job stopped (finished rows are kept: fix the inputs and rerun, with "
            "--retry-errors to redo the failed ones)"
        )

    def _write_sidecar(self, record: Record) -> None:
        if not self.options.sidecar or not record.get("path"):
            return
        text = caption_to_keep(record)
        if text is None:
            return
        target = sidecar_path(self.options.locate(record["path"]), self.options.sidecar)
        if not self.options.overwrite and self._has_sidecar(record, target):
            return
        write_sidecar(target, text)

    def _has_sidecar(self, record: Record, target: Location) -> bool:
        """For an image in a folder the listing told; for a table's image file, ask."""
        if record["path"] in self._kept_sidecars:
            return True
        return bool(record.get("row")) and target.exists()

    def close(self) -> None:
        if self._progress:
            self._progress.close()
        if self.journal:
            self.journal.close()

    def finish(self) -> Summary:
        """After :meth:`close`: write the final output from the journal; then judge
        ``--max-failures`` over the whole run."""
        if self.journal:
            self.journal.merge()
        if self.journal and self.format and self.output:
            self.summary.written = write_output(self.format, self.output, self.journal.records())
        self.summary.elapsed_s = time.monotonic() - self._started
        s, limit = self.summary, self.options.max_failures
        if limit and limit.exceeded(s.failed, s.done + s.failed):
            raise self._too_many(limit)
        return self.summary


class BatchJob(JobBook):
    """Run ``engine`` over every row of ``options.input``.

    ``filter_engine`` (an image-text matching model) turns on CapFilt: each generated
    caption, and each row's original text, gets a match probability and is kept when it
    reaches ``options.min_match``.
    """

    def __init__(
        self, engine: Engine, options: BatchOptions, filter_engine: Engine | None = None
    ) -> None:
        self.engine = engine
        self.filter_engine = filter_engine
        super().__init__(
            options, engine.adapter.source, filter_engine.adapter.source if filter_engine else None
        )

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Summary:
        o = self.options
        window: deque[tuple[InputRow, Future[PreparedRow] | None]] = deque()
        starter = RowStarter(self.engine, o)
        try:
            for row in self.todo():
                window.append((row, starter.start(row)))
                if len(window) >= 2 * o.chunk_rows:
                    self._process([window.popleft() for _ in range(o.chunk_rows)])
            while window:
                n = min(o.chunk_rows, len(window))
                self._process([window.popleft() for _ in range(n)])
        finally:
            for _, future in window:
                if future is not None:
                    future.cancel()
            starter.close()
            self.close()
        return self.finish()

    def _process(self, chunk: list[tuple[InputRow, Future[PreparedRow] | None]]) -> None:
        self.commit(make_records(self.engine, chunk, self.options, self.filter_engine))


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
        if row.path is None:
            pool = self.engine.decode_pool
            return pool.submit(
                self.engine.prepare, self._input(row, row.image), self.options.params
            )
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
) -> list[Record]:
    """The journal records of rows started with :class:`RowStarter`; bad rows get errors.

    Shared by the local job and the Ray actors, so both write the same records.
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
    records = [_record(row, outcome) for (row, _), outcome in zip(chunk, outcomes, strict=True)]
    if filter_engine:
        _capfilt(filter_engine, records, prepared, options.min_match)
    return records


def _record(row: InputRow, outcome: object) -> Record:
    record: Record = {"id": row.id, "text": "", "score": None, "error": ""}
    if isinstance(outcome, Prediction):
        record["text"] = outcome.text
        record["score"] = outcome.score
    elif isinstance(outcome, RowError):
        record["error"] = outcome.reason
    else:
        record["error"] = getattr(outcome, "message", str(outcome))
    record.update(source=row.source, row=row.row, path=row.path)
    return record


def _capfilt(
    filter_engine: Engine,
    records: list[Record],
    prepared: list[PreparedRow | RowError],
    min_match: float,
) -> None:
    """Score (image, caption) and (image, original text) with the matching model."""
    adapter = filter_engine.adapter
    pairs: list[PreparedRow] = []
    targets: list[tuple[Record, str]] = []
    for record, prep in zip(records, prepared, strict=True):
        if record["error"] or not isinstance(prep, PreparedRow):
            continue
        for column, text in (("keep", record["text"]), ("text_in_keep", prep.item.text)):
            if not text:
                continue
            item = ModelInput(image=prep.item.image, text=text, params=GenerationParams())
            pairs.append(PreparedRow(prep.row, item, adapter.batch_key(item)))
            targets.append((record, column))
        if prep.item.text:
            record["text_in"] = prep.item.text
    for (record, column), outcome in zip(targets, filter_engine.run_prepared(pairs), strict=True):
        if not isinstance(outcome, Prediction) or outcome.score is None:
            record["error"] = f"matching failed: {getattr(outcome, 'message', outcome)}"
            continue
        keep = outcome.score >= min_match
        if column == "keep":
            record["score"], record["keep"] = outcome.score, keep
        else:
            record["text_in_score"], record["text_in_keep"] = outcome.score, keep


class _Progress:
    """A tqdm bar on a terminal; periodic log lines (rate, ETA) otherwise."""

    def __init__(self, total: int | None, bar: bool | None, every_s: float, summary: Summary):
        self.total = total
        self.every_s = every_s
        self.summary = summary
        self.seen = 0
        self.started = self.last_log = time.monotonic()
        self.bar: Any = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.seen += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(failed=self.summary.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_log >= self.every_s:
            self.last_log = now
            rate = self.seen / (now - self.started)
            eta = ""
            if self.total and rate > 0:
                eta = f", ETA {(self.total - self.seen) / rate:.0f} s"
            of = f"/{self.total}" if self.total else ""
            log.info("%d%s rows (%s; %.2f rows/s%s)", self.seen, of, self.summary.line(), rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = [
    "BatchJob",
    "BatchOptions",
    "FailureLimit",
    "JobBook",
    "OutputError",
    "RowStarter",
    "Summary",
    "TooManyFailures",
    "make_records",
]
