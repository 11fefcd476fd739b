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


class BatchJob:
    """Run ``engine`` over every row of ``options.input``.

    ``filter_engine`` (an image-text matching model) turns on CapFilt: each generated
    caption, and each row's original text, gets a match probability and is kept when it
    reaches ``options.min_match``.
    """

    def __init__(
        self, engine: Engine, options: BatchOptions, filter_engine: Engine | None = None
    ) -> None:
        if options.output is None and options.sidecar is None:
            raise InvalidInput("nothing to write: give --output, --sidecar, or both")
        self.engine = engine
        self.options = options
        self.filter_engine = filter_engine
        self.format = infer_format(options.output, options.format) if options.output else None
        self.journal = (
            Journal(
                options.output.with_name(f".{options.output.name}.journal.jsonl"), self.signature()
            )
            if options.output
            else None
        )
        self.summary = Summary()

    def signature(self) -> dict[str, Any]:
        """What identifies this job's results: a rerun with another signature is refused."""
        o = self.options
        return {
            "input": str(o.input.resolve()),
            "model": self.engine.adapter.source,
            "params": o.params.generate_kwargs(),
            "prompt": o.prompt,
            "filter": self.filter_engine.adapter.source if self.filter_engine else None,
            "min_match": o.min_match if self.filter_engine else None,
        }

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Summary:
        o = self.options
        started = time.monotonic()
        done = self.journal.open(overwrite=o.overwrite) if self.journal else {}
        progress = _Progress(count_rows(o.input), o.progress, o.log_every_s, self.summary)
        window: deque[tuple[InputRow, Future[PreparedRow] | None]] = deque()
        try:
            for row in iter_rows(o.input):
                if self._skip(row, done):
                    self.summary.skipped += 1
                    progress.update(1)
                    continue
                window.append((row, self._submit(row)))
                if len(window) >= 2 * o.chunk_rows:
                    self._process([window.popleft() for _ in range(o.chunk_rows)], progress)
            while window:
                n = min(o.chunk_rows, len(window))
                self._process([window.popleft() for _ in range(n)], progress)
        finally:
            for _, future in window:
                if future is not None:
                    future.cancel()
            progress.close()
            if self.journal:
                self.journal.close()
        if self.journal and self.format and o.output:
            self.summary.written = write_output(self.format, o.output, self.journal.records())
        self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    def _skip(self, row: InputRow, done: dict[str, bool]) -> bool:
        if row.id in done and (done[row.id] or not self.options.retry_errors):
            return True
        if self.options.sidecar and row.path and not self.options.overwrite:
            # An existing caption file is left alone (and is the record for sidecar-only jobs).
            return sidecar_path(row.path, self.options.sidecar).exists() and self.journal is None
        return False

    def _submit(self, row: InputRow) -> Future[PreparedRow] | None:
        if row.error:
            return None
        text = row.text or self.options.prompt
        row_input = RowInput(position=0, image=row.image, text=text, index=row.id)
        return self.engine.decode_pool.submit(
            self.engine.prepare, row_input, self.options.params, allow_paths=True
        )

    def _process(
        self, chunk: list[tuple[InputRow, Future[PreparedRow] | None]], progress: _Progress
    ) -> None:
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
        outcomes = self.engine.run_prepared(prepared)
        records = [
            self._record(row, outcome) for (row, _), outcome in zip(chunk, outcomes, strict=True)
        ]
        if self.filter_engine:
            self._capfilt(records, prepared)
        if self.journal:
            self.journal.append(records)
        for (row, _), record in zip(chunk, records, strict=True):
            self._write_sidecar(row, record)
            if record["error"]:
                self.summary.failed += 1
                log.warning("%s: %s", row.id, record["error"])
            else:
                self.summary.done += 1
        progress.update(len(chunk))

    def _record(self, row: InputRow, outcome: object) -> Record:
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

    def _capfilt(self, records: list[Record], prepared: list[PreparedRow | RowError]) -> None:
        """Score (image, caption) and (image, original text) with the matching model."""
        assert self.filter_engine is not None
        adapter = self.filter_engine.adapter
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
        for (record, column), outcome in zip(
            targets, self.filter_engine.run_prepared(pairs), strict=True
        ):
            if not isinstance(outcome, Prediction) or outcome.score is None:
                record["error"] = f"matching failed: {getattr(outcome, 'message', outcome)}"
                continue
            keep = outcome.score >= self.options.min_match
            if column == "keep":
                record["score"], record["keep"] = outcome.score, keep
            else:
                record["text_in_score"], record["text_in_keep"] = outcome.score, keep

    def _write_sidecar(self, row: InputRow, record: Record) -> None:
        if not self.options.sidecar or row.path is None:
            return
        text = caption_to_keep(record)
        target = sidecar_path(row.path, self.options.sidecar)
        if text is None or (target.exists() and not self.options.overwrite):
            return
        write_sidecar(target, text)


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


__all__ = ["BatchJob", "BatchOptions", "OutputError", "Summary"]
