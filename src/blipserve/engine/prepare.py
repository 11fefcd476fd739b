"""Stage 1 of the request path: a row in, a row ready for the model (or its error) out.

Fetching and decoding an image is I/O and C work that releases the GIL, so rows are
prepared on a pool of threads; a bad row becomes its :class:`RowError`, never a failed
batch.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from blipserve.config import FetchConfig, ImageLimits
from blipserve.engine.trace import RequestTrace
from blipserve.errors import InvalidInput, RowError
from blipserve.fetch import SafeFetcher
from blipserve.images import Fetcher, load_image
from blipserve.models.protocol import Adapter
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, RowInput


@dataclass(frozen=True)
class PreparedRow:
    """A row ready for the model, with the key that decides its batch."""

    row: RowInput
    item: ModelInput
    key: Hashable = field(compare=False)


_TEXT_NEEDED = {
    "question": "this model answers questions: put the question in the 'text' column",
    "match": "this model scores image-text pairs: put the text to match in the 'text' column",
}


class RowPreparer:
    """Fetches and decodes rows' images under ``limits`` and checks their text."""

    def __init__(
        self, adapter: Adapter, limits: ImageLimits, fetch: FetchConfig, workers: int
    ) -> None:
        self.adapter = adapter
        self.limits = limits
        self.fetcher = SafeFetcher(fetch) if fetch.allow_urls else None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blipserve-decode")

    def prepare(
        self,
        row: RowInput,
        params: GenerationParams,
        *,
        allow_paths: bool = False,
        trace: RequestTrace | None = None,
    ) -> PreparedRow:
        """Fetch and decode the row's image and check its text; raise :class:`RowError`.

        ``trace``: when the row's image was fetched (``fetch``) and decoded (``decode``).
        """
        started_ns = time.time_ns()
        fetcher: Fetcher | None = self.fetcher
        if trace is not None and fetcher is not None:
            fetcher = _TimedFetcher(fetcher, trace, row.position)
        try:
            if row.text is None and self.adapter.text_required:
                raise InvalidInput(_TEXT_NEEDED.get(self.adapter.text_role, "'text' is required"))
            image = load_image(
                row.image,
                limits=self.limits,
                fetcher=fetcher,
                target_size=self.adapter.image_size,
                allow_paths=allow_paths,
            )
            return self.admit(row, ModelInput(image=image, text=row.text, params=params))
        except RowError:
            raise
        except InvalidInput as exc:
            raise RowError(row.position, exc.message, row.index) from exc
        finally:
            if trace is not None:
                fetched = fetcher.ended_ns if isinstance(fetcher, _TimedFetcher) else None
                trace.record("decode", fetched or started_ns, time.time_ns(), row=row.position)

    def admit(self, row: RowInput, item: ModelInput) -> PreparedRow:
        """``item`` (``row``, decoded) checked by the model (``Adapter.check_row``) and keyed
        for batching; a row the model cannot take raises its :class:`RowError`."""
        try:
            self.adapter.check_row(item)
        except InvalidInput as exc:
            raise RowError(row.position, exc.message, row.index) from exc
        return PreparedRow(row, item, self.adapter.batch_key(item))

    def prepare_all(
        self, rows: Iterable[RowInput], params: GenerationParams, *, allow_paths: bool = False
    ) -> list[PreparedRow | RowError]:
        """:meth:`prepare` every row concurrently; bad rows come back as their error."""
        futures = [
            self.pool.submit(self.prepare, row, params, allow_paths=allow_paths) for row in rows
        ]
        out: list[PreparedRow | RowError] = []
        for future in futures:
            try:
                out.append(future.result())
            except RowError as exc:
                out.append(exc)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _TimedFetcher:
    """A fetcher that records its download in a request's trace."""

    def __init__(self, fetcher: Fetcher, trace: RequestTrace, row: int) -> None:
        self.fetcher, self.trace, self.row = fetcher, trace, row
        self.ended_ns: int | None = None

    def fetch(self, url: str) -> bytes:
        started_ns = time.time_ns()
        try:
            return self.fetcher.fetch(url)
        finally:
            self.ended_ns = time.time_ns()
            self.trace.record("fetch", started_ns, self.ended_ns, row=self.row)
