"""A batch job's unit of work, whatever input it was read from, and what became of it."""

from __future__ import annotations

from dataclasses import dataclass

from blipserve.errors import RowError
from blipserve.types import Outcome, Prediction


@dataclass(frozen=True)
class InputRow:
    """One unit of work.

    ``image`` is what the engine decodes (an http(s) URL or base64 text) or, for a file, its
    location; ``path`` is set when the image is a file (local path or store URL) for the job
    to read, and sidecars go next to it; ``source`` and ``row`` locate table rows (the
    catalog's predictions.csv reports them); ``error`` is set when the row itself is
    unreadable (e.g. no image value), so it is recorded rather than run.  ``has_sidecar``:
    the folder listing showed a caption file next to the image already (driver side only);
    ``data``: the image's bytes, when they came with the row (a WebDataset sample).
    """

    id: str
    image: str
    text: str | None = None
    path: str | None = None
    source: str | None = None
    row: str | None = None
    error: str | None = None
    has_sidecar: bool = False
    data: bytes | None = None  # the image itself (a shard's sample)


@dataclass(frozen=True)
class RowResult:
    """What became of one input row: what the journal records and the outputs are written
    from.  Built by :meth:`of` (or :meth:`failed`) wherever the row ran, here or on a Ray
    actor; CapFilt (:mod:`blipserve.batch.capfilt`) returns a copy with its scores.

    ``text`` and ``score`` are the model's ("" and None for a failed row, whose ``error``
    says why); ``texts``: every text of a row that asked for several, best first;
    ``source``, ``row`` and ``path`` locate the input row (a table's file and row, an
    image file).  CapFilt's fields are None unless the matching model scored them:
    ``keep`` (the best caption reached --min-match), ``text_in`` (the row's own text),
    ``text_in_score`` and ``text_in_keep``, and ``text_scores`` (with several texts: the
    kept ones' scores, as ``texts`` then holds only those).

    >>> RowResult.failed(InputRow("a.jpg", "a.jpg"), "not an image").error
    'not an image'
    """

    id: str
    text: str = ""
    score: float | None = None
    error: str = ""
    texts: tuple[str, ...] | None = None
    source: str | None = None
    row: str | None = None
    path: str | None = None
    # CapFilt's (--filter-model)
    text_in: str | None = None
    text_in_score: float | None = None
    text_in_keep: bool | None = None
    keep: bool | None = None
    text_scores: tuple[float, ...] | None = None

    @classmethod
    def of(cls, row: InputRow, outcome: Outcome) -> RowResult:
        """``row``'s result from the engine's outcome for it."""
        if not isinstance(outcome, Prediction):
            reason = outcome.reason if isinstance(outcome, RowError) else outcome.message
            return cls.failed(row, reason)
        return cls(
            row.id,
            outcome.text,
            outcome.score,
            texts=tuple(outcome.texts) if outcome.texts is not None else None,
            source=row.source,
            row=row.row,
            path=row.path,
        )

    @classmethod
    def failed(cls, row: InputRow, error: str) -> RowResult:
        """``row`` failed with ``error``."""
        return cls(row.id, error=error, source=row.source, row=row.row, path=row.path)

    def caption(self) -> str | None:
        """The text a caption file, metadata row or output shard gets: none for a failed
        row; with CapFilt only what passed (the best caption, else the row's own text)."""
        if self.error:
            return None
        if self.keep is False:
            return self.text_in if self.text_in_keep else None
        return self.text
