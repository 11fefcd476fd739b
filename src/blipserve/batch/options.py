"""A batch job's options and its summary: what the CLI and Python callers fill in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from blipserve.batch.storage import Location, locate
from blipserve.config import BatchConfig
from blipserve.errors import BlipserveError, ImageError
from blipserve.params import GenerationParams


class TooManyFailures(BlipserveError):
    """More rows failed than ``--max-failures`` allows: the job stopped (what is done is
    kept in the journal; a rerun resumes)."""


class PathGuard(Protocol):
    """Which files a job may read and write (a hosted job: the operator's allowed roots)."""

    def allowed(self, url: str) -> bool: ...


@dataclass(frozen=True, kw_only=True)
class BatchOptions(BatchConfig):
    """One batch job: its :class:`~blipserve.config.BatchConfig` (``--output``, ``--sidecar``,
    ... with their defaults) plus what is the job's own: the ``input`` (a local path or an
    object-store URL) and the generation parameters.  ``storage_options`` (credentials
    among them) go to the stores' filesystems only.  ``guard``: the only files the job
    may touch, whatever its rows name (a table's image paths included)."""

    input: str | os.PathLike[str]
    params: GenerationParams = field(default_factory=GenerationParams)
    guard: PathGuard | None = None

    def locate(self, where: str | os.PathLike[str]) -> Location:
        if self.guard is not None and not self.guard.allowed(os.fspath(where)):
            raise ImageError(
                f"'{os.fspath(where)}' is outside the folders this server lets jobs read "
                "(--jobs-allow-root)"
            )
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
