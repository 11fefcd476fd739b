"""The batch job: stream rows -> decode in parallel -> engine batches -> durable results.

Memory stays bounded: at most ``window`` rows are in flight (decoding ahead of the model
while it runs), whatever the input size.  Every finished chunk is journaled before the
next one starts, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipserve.batch.journal import Journal, OutputError, Record
from blipserve.batch.sinks import (
    caption_to_keep,
    infer_format,
    sidecar_path,
    write_output,
    write_sidecar,
)
from blipserve.batch.sources import InputRow, count_rows, iter_rows
from blipserve.contract import Prediction, RowInput
from blipserve.engine import Engine, PreparedRow
from blipserve.errors import InvalidInput, RowError
from blipserve.models.base import ModelInput
from blipserve.params import GenerationParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOptions:
    input: Path
    output: Path | None = None
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
        self.format = infer_format(options.output, options.format) if options.output else None
        self.journal = (
            Journal(
                options.output.with_name(f".{options.output.name}.journal.jsonl"), self.signature()
            )
            if options.output
            else None
        )
        self.summary = Summary()
        self._started = time.monotonic()
        self._progress: _Progress | None = None

    def signature(self) -> dict[str, Any]:
        """What identifies this job's results: a rerun with another signature is refused."""
        o = self.options
        return {
            "input": str(o.input.resolve()),
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
        self._progress = _Progress(count_rows(o.input), o.progress, o.log_every_s, self.summary)
        for row in iter_rows(o.input):
            if self._skip(row, done):
                self.summary.skipped += 1
                self._progress.update(1)
            else:
                yield row

    def _skip(self, row: InputRow, done: dict[str, bool]) -> bool:
        if row.id in done and (done[row.id] or not self.options.retry_errors):
            return True
        if self.options.sidecar and row.path and not self.options.overwrite:
            # An existing caption file is left alone (and is the record for sidecar-only jobs).
            return sidecar_path(row.path, self.options.sidecar).exists() and self.journal is None
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

    def _write_sidecar(self, record: Record) -> None:
        if not self.options.sidecar or not record.get("path"):
            return
        text = caption_to_keep(record)
        target = sidecar_path(Path(record["path"]), self.options.sidecar)
        if text is None or (target.exists() and not self.options.overwrite):
            return
        write_sidecar(target, text)

    def close(self) -> None:
        if self._progress:
            self._progress.close()
        if self.journal:
            self.journal.close()

    def finish(self) -> Summary:
        """After :meth:`close`: write the final output from the journal."""
        o = self.options
        if self.journal and self.format and o.output:
            self.summary.written = write_output(self.format, o.output, self.journal.records())
        self.summary.elapsed_s = time.monotonic() - self._started
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
        try:
            for row in self.todo():
                window.append((row, submit_row(self.engine, row, o)))
                if len(window) >= 2 * o.chunk_rows:
                    self._process([window.popleft() for _ in range(o.chunk_rows)])
            while window:
                n = min(o.chunk_rows, len(window))
                self._process([window.popleft() for _ in range(n)])
        finally:
            for _, future in window:
                if future is not None:
                    future.cancel()
            self.close()
        return self.finish()

    def _process(self, chunk: list[tuple[InputRow, Future[PreparedRow] | None]]) -> None:
        self.commit(make_records(self.engine, chunk, self.options, self.filter_engine))


def submit_row(engine: Engine, row: InputRow, options: BatchOptions) -> Future[PreparedRow] | None:
    """Start decoding ``row`` in the engine's pool (None: the row itself is unreadable)."""
    if row.error:
        return None
    text = row.text or options.prompt
    row_input = RowInput(position=0, image=row.image, text=text, index=row.id)
    return engine.decode_pool.submit(engine.prepare, row_input, options.params, allow_paths=True)


def make_records(
    engine: Engine,
    chunk: Sequence[tuple[InputRow, Future[PreparedRow] | None]],
    options: BatchOptions,
    filter_engine: Engine | None = None,
) -> list[Record]:
    """The journal records of rows submitted with :func:`submit_row`; bad rows get errors.

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
        except Exception as exc:  # a bug must not lose the other rows
            log.exception("decoding %s failed", row.id)
            prepared.append(RowError(0, f"{type(exc).__name__}: {exc}", row.id))
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
    record.update(source=row.source, row=row.row, path=str(row.path) if row.path else None)
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
    "JobBook",
    "OutputError",
    "Summary",
    "make_records",
    "submit_row",
]
