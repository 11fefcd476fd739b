"""A batch job's options and its summary: what the CLI and Python callers fill in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blipserve.batch.storage import Location, locate
from blipserve.errors import BlipserveError, InvalidInput, quote
from blipserve.params import GenerationParams


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
    text_from: str | None = None  # a shard sample's text: "txt" or "json:FIELD"
    caption_key: str = "caption"  # output shards: KEY.<caption_key>.txt and a KEY.json field
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
