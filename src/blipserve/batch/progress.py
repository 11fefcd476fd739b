"""A batch job's counts as its rows finish, what it shows of them, and ``--max-failures``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from blipserve.batch.options import Summary, TooManyFailures
from blipserve.batch.rows import RowResult
from blipserve.config import FailureLimit

log = logging.getLogger(__name__)


class Progress:
    """Counts a job's rows into its :class:`~blipserve.batch.options.Summary`, shows them
    (a tqdm bar on a terminal, else a log line every ``every_s``), and stops the job with
    :class:`~blipserve.batch.options.TooManyFailures` once more rows failed than ``limit``.

    ``bar``: show a bar (None: on a terminal).  Not thread-safe: the job's book calls it
    under its lock.
    """

    def __init__(self, limit: FailureLimit | None, bar: bool | None, every_s: float) -> None:
        self.limit = limit
        self.summary = Summary()
        self.total: int | None = None  # the input's rows, where cheap to know
        self._bar, self._every_s = bar, every_s
        self._started = time.monotonic()
        self._display: _Display | None = None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def start(self) -> None:
        """The job starts: its clock from now."""
        self._started = time.monotonic()

    def open(self, total: int | None) -> None:
        """The rows are about to come: ``total`` of them (None: not known)."""
        self.total = total
        self._display = _Display(total, self._bar, self._every_s, self.summary)

    def skipped(self, n: int) -> None:
        """``n`` rows were recorded by an earlier run (or have a caption file already)."""
        self.summary.skipped += n
        if self._display:
            self._display.update(n)

    def finished(self, results: Sequence[RowResult]) -> None:
        """Rows finished (and are recorded): counted, failures logged; the job stops here
        once the failures are over the limit (a share only where the input's size is
        known, else at the end: :meth:`end`)."""
        for result in results:
            if result.error:
                self.summary.failed += 1
                log.warning("%s: %s", result.id, result.error)
            else:
                self.summary.done += 1
        if self._display:
            self._display.update(len(results))
        limit, s = self.limit, self.summary
        judged = limit is not None and (limit.count is not None or self.total is not None)
        if limit and judged and limit.exceeded(s.failed, s.done + s.failed, self.total):
            raise self._too_many(limit)

    def close(self) -> None:
        if self._display:
            self._display.close()

    def end(self, written: int | None) -> Summary:
        """The job's summary (``written``: the output's rows or shards), once its output is
        written; :class:`~blipserve.batch.options.TooManyFailures` judged over the whole
        run."""
        s, limit = self.summary, self.limit
        if written is not None:
            s.written = written
        s.elapsed_s = self.elapsed_s
        if limit and limit.exceeded(s.failed, s.done + s.failed):
            raise self._too_many(limit)
        return s

    def _too_many(self, limit: FailureLimit) -> TooManyFailures:
        s = self.summary
        return TooManyFailures(
            f"{s.failed} of {s.done + s.failed} rows failed, more than --max-failures {limit}; "
            "the job stopped (finished rows are kept: fix the inputs and rerun, with "
            "--retry-errors to redo the failed ones)"
        )


class _Display:
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


__all__ = ["Progress"]
