"""The driver's side of a batch job, wherever its rows run (here, or on Ray): the rows
still to do, and what becomes of each finished one, by the parts that keep it."""

from __future__ import annotations

import functools
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from blipserve.batch.journal import JobJournal, open_journal
from blipserve.batch.options import BatchOptions, Summary
from blipserve.batch.progress import Progress
from blipserve.batch.rows import InputRow, RowResult
from blipserve.batch.shards import ShardOutput, check_text_from, is_pattern
from blipserve.batch.sinks import Sidecars, TableOutput, infer_format, table_columns
from blipserve.batch.sources import (
    ReadOptions,
    count_rows,
    is_shards,
    iter_rows,
    shard_list,
    shard_locations,
)
from blipserve.batch.storage import Location
from blipserve.errors import InvalidInput, JobStopped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardWork:
    """One shard for a worker: ``name`` (its rows' source), ``location`` (a path or URL),
    ``dest``: the output shard to write once its rows are captioned (None: the output is
    a table), and ``recorded``: the rows recorded already (id -> caption to keep), which
    are not captioned again."""

    name: str
    location: str
    dest: str | None
    recorded: dict[str, str | None]


@dataclass(frozen=True)
class ShardEnd:
    """A worker read the shard ``name`` to its end (after sending its rows' results):
    ``rows`` rows, ``skipped`` of them recorded already; ``written``: its output shard."""

    name: str
    rows: int
    skipped: int
    written: bool


class JobBook:
    """The driver's side of a batch job, wherever its rows run (here, or on Ray).

    It is made of parts, each kept by one object: the ``journal`` (rows recorded durably,
    so a job resumes, and local and Ray runs resume each other), the ``progress`` (counts,
    their display, ``--max-failures``), the ``shards`` (output shards, written as their
    rows finish), the ``sidecars`` (caption files) and the ``table`` (the final output,
    written from the journal).  The book yields the rows still to do (:meth:`todo`), hands
    each finished row to the parts (:meth:`commit`) and ends the job (:meth:`finish`).
    ``model_source`` and ``filter_source`` identify the models; once ``stop`` is set the
    job stops at its next commit (a hosted job canceled, its server stopping).

    Its use, as :class:`~blipserve.batch.runner.BatchJob` and Ray's driver make it::

        book = JobBook(BatchOptions(input="photos/", output="out.csv"), "Salesforce/blip")
        try:
            for rows in chunks(book.todo()):
                book.commit([RowResult.of(row, outcome) for row, outcome in run(rows)])
        finally:
            book.close()
        summary = book.finish()
    """

    def __init__(
        self,
        options: BatchOptions,
        model_source: str,
        filter_source: str | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        if options.output is None and options.sidecar is None:
            raise InvalidInput("nothing to write: give --output, --sidecar, or both")
        self.options = options
        self.model_source = model_source
        self.filter_source = filter_source
        self.stop = stop
        self.input = options.locate(options.input)
        self.output = options.locate(options.output) if options.output is not None else None
        check_text_from(options.text_from)
        shards_in = is_shards(self.input)
        self.format = self._format(shards_in)
        if shards_in and options.sidecar:
            raise InvalidInput("--sidecar writes files next to images; shards have none")
        self.shards: ShardOutput | None = None
        self.table: TableOutput | None = None
        if self.format == "webdataset" and self.output:
            if not shards_in:
                raise InvalidInput("--format webdataset needs WebDataset shards as the input")
            self.shards = ShardOutput(self.output, self._shard_input, options.caption_key)
        elif self.format and self.output:
            several = (options.params.num_return_sequences or 1) > 1
            columns = table_columns(several_texts=several, capfilt=filter_source is not None)
            self.table = TableOutput(self.format, self.output, columns)
        self.journal: JobJournal | None = (
            open_journal(self.output, self.signature()) if self.output else None
        )
        self.sidecars: Sidecars | None = None
        if options.sidecar:
            self.sidecars = Sidecars(
                options.sidecar,
                options.sidecar_captions,
                options.locate,
                overwrite=options.overwrite,
            )
        self.progress = Progress(options.max_failures, options.progress, options.log_every_s)
        # commit() runs on a writer thread while todo() reads on the job's (CommitBehind):
        # the shards' state, the counts and the progress are changed under this lock
        self._books = threading.Lock()

    @property
    def summary(self) -> Summary:
        """The job's counts so far."""
        return self.progress.summary

    @property
    def total(self) -> int | None:
        """The input's rows, where cheap to know (once the job is open)."""
        return self.progress.total

    @property
    def elapsed_s(self) -> float:
        return self.progress.elapsed_s

    def _format(self, shards_in: bool) -> str | None:
        if self.output is None:
            return None
        if self.options.format is None and shards_in and not self.output.suffix:
            return "webdataset"  # a folder for the captioned shards
        return infer_format(self.output, self.options.format)

    def _shard_input(self, name: str) -> Location:
        """The input shard an output shard copies."""
        if is_pattern(self.input.path):
            return self._pattern_shards[name]
        return self.input.child(name) if self.input.suffix.lower() != ".tar" else self.input

    @functools.cached_property
    def _pattern_shards(self) -> dict[str, Location]:
        return dict(shard_locations(self.input))  # expanded once, not once per shard

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
            **({"text_from": o.text_from} if o.text_from else {}),
        }

    def _open(self, preload: bool = True) -> dict[str, bool]:
        """Open the journal (``{row id: succeeded}`` of rows recorded already) and progress;
        ``preload``: the recorded captions of output shards still to write, for :meth:`todo`."""
        self.progress.start()
        done = self.journal.open(overwrite=self.options.overwrite) if self.journal else {}
        if preload and self.shards and self.journal and done:
            self.shards.preload(self.journal.records())
        self.progress.open(count_rows(self.input))
        return done

    def todo(self) -> Iterator[InputRow]:
        """Open the journal; yield the input rows not done yet (the rest count as skipped)."""
        o, done, shards = self.options, self._open(), self.shards
        how = ReadOptions(
            exclude=self._written(),
            sidecar=o.sidecar,
            text_from=o.text_from,
            skip_shard=shards.is_written if shards and not o.overwrite else None,
            allowed=o.guard.allowed if o.guard else None,
        )
        for row in iter_rows(self.input, how):
            skip = self._skip(row, done)
            with self._books:
                if shards and row.source:
                    shards.expect(row.source, recorded=skip)
                if skip:
                    self.progress.skipped(1)
            if not skip:
                yield row
        if shards:
            with self._books:
                shards.end_of_input()
                shards.flush()

    def shard_work(self) -> list[ShardWork] | None:
        """For a job whose input is only WebDataset shards, each shard still to read, for
        workers that read (and write) shards themselves: Ray actors.  None for any other
        input (:meth:`todo` reads it).  Opens the journal."""
        guard = self.options.guard
        shards = shard_list(self.input, self._written(), guard.allowed if guard else None)
        if not shards:
            return None
        done = self._open(preload=False)
        recorded: defaultdict[str, dict[str, str | None]] = defaultdict(dict)
        if done and self.journal:
            for result in self.journal.records():
                if result.source and self._recorded(result.id, done):
                    recorded[result.source][result.id] = result.caption()
        out, overwrite = self.shards, self.options.overwrite
        work = []
        for name, where in shards:
            if out and not overwrite and out.is_written(name):
                log.info("%s: its output shard is written already; skipped", name)
                continue
            dest = str(out.folder.child(name)) if out else None
            work.append(ShardWork(name, str(where), dest, recorded.pop(name, {})))
        return work

    def shard_read(self, end: ShardEnd) -> None:
        """A worker read a shard to its end (its rows' results came to :meth:`commit`)."""
        self.progress.skipped(end.skipped)
        if end.written and self.shards:
            log.info("wrote %s", self.shards.folder.child(end.name))
            self.shards.written += 1

    def _written(self) -> frozenset[str]:
        """What this job writes, which is never one of its inputs."""
        if self.output is None:
            return frozenset()
        return frozenset({str(self.output)})  # (its temporary files are hidden: never read)

    def _recorded(self, row_id: str, done: dict[str, bool]) -> bool:
        """Whether the journal's record of ``row_id`` stands (a failed one is redone with
        --retry-errors)."""
        return row_id in done and (done[row_id] or not self.options.retry_errors)

    def _skip(self, row: InputRow, done: dict[str, bool]) -> bool:
        if self._recorded(row.id, done):
            return True
        if self.sidecars and row.path and row.has_sidecar and not self.options.overwrite:
            # An existing caption file is left alone (and is the record for sidecar-only jobs).
            self.sidecars.keep(row.path)
            return self.journal is None
        return False

    def commit(self, results: Sequence[RowResult]) -> None:
        """Record finished rows: journal (durably), output shards, sidecars, counts.  Safe
        to call on another thread than :meth:`todo`'s (one commit at a time); once
        :attr:`stop` is set, :class:`~blipserve.errors.JobStopped` (after this commit)."""
        with self._books:
            if self.journal:
                self.journal.append(results)
            if self.shards:
                self.shards.record(results)
                self.shards.flush()
            if self.sidecars:
                for result in results:
                    self.sidecars.write(result)
            self.progress.finished(results)
        if self.stop is not None and self.stop.is_set():
            raise JobStopped("the job was stopped; what is done is journaled")

    def close(self) -> None:
        self.progress.close()
        if self.journal:
            self.journal.close()

    def finish(self) -> Summary:
        """After :meth:`close`: write the final output from the journal; then judge
        ``--max-failures`` over the whole run."""
        written = None
        if self.journal:
            self.journal.merge()
        if self.shards:
            self.shards.end_of_input()
            self.shards.flush()
            written = self.shards.written
        elif self.journal and self.table:
            written = self.table.write(self.journal.records())
        return self.progress.end(written)


__all__ = ["JobBook", "ShardEnd", "ShardWork"]
