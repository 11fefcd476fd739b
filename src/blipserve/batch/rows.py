"""The unit of work of a batch job, whatever input it was read from."""

from __future__ import annotations

from dataclasses import dataclass


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
