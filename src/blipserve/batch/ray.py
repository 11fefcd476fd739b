"""Batch jobs on Ray Data: the local job's rows, records, journal and outputs, run by actors.

WebDataset shards are split across the actors shard by shard: the driver lists the shards
and, from the journal, the rows of each that are recorded already; an actor reads a whole
shard itself (from an object store, with the job's storage options), skips those rows,
sends back the others' records, writes the captioned output shard when the output is
shards, and last sends the shard's end (how many rows it held, in a column of its own
beside the results: :func:`shard_messages`).  The driver never reads a sample.
(An output shard written just before a kill, whose last records the driver had not yet
journaled, counts as done on resume: the shard is the output, and it is whole.)

Any other input is read by the driver with :func:`~blipserve.batch.sources.iter_rows` (so
rows keep the local job's ids), skipping what the journal already holds exactly as the
local job does: a local run and a Ray run resume each other.  The rows still to do are
put into the object store in Arrow blocks of a few chunks each (only one block is in the
driver's memory at a time; the input is listed before the model starts, which for image
paths is quick).
Model actors (one :class:`~blipserve.engine.Engine` each, loaded once) turn batches of rows
into results with the local job's own :func:`~blipserve.batch.runner.make_records` (sent
back as journal lines); the driver streams them back in input order into the job's book
(journal, sidecars, counts), then writes the final output.  Actors read image files
themselves: from an object store (``s3://``, ``az://``, ``gs://``, with the job's storage
options) no shared filesystem is needed; local paths must be readable where the actors run
(one machine, or a shared filesystem).  blipserve must be installed where the actors run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from blipserve.batch.book import ShardEnd, ShardWork
from blipserve.batch.journal import result_line, result_of_line
from blipserve.batch.rows import InputRow, RowResult
from blipserve.batch.runner import (
    BatchOptions,
    JobBook,
    RowStarter,
    Summary,
    make_records,
    records_of,
)
from blipserve.batch.shards import write_shard
from blipserve.batch.sources import ReadOptions, iter_shard
from blipserve.batch.storage import StorageError
from blipserve.config import Settings
from blipserve.errors import BlipserveError, InvalidInput

log = logging.getLogger(__name__)

#: InputRow's fields, as the dataset's (nullable) string columns; ``data`` (a shard
#: sample's image) is a binary one, and has_sidecar is the driver's business
COLUMNS = tuple(
    f.name for f in dataclasses.fields(InputRow) if f.name not in ("has_sidecar", "data")
)
BLOCK_CHUNKS = 4  # chunks of rows per block in the object store


def run_on_ray(
    options: BatchOptions, settings: Settings, stop: threading.Event | None = None
) -> Summary:
    """Run the batch job described by ``options`` on Ray Data; same results as locally.

    The model actors load ``settings.model`` (and ``options.filter_model``) with the
    engine, image and fetch settings; ``settings.ray`` says which cluster to join (none:
    start a local one, or use the one this process already joined) and how many actors
    to start, each with how many GPUs.  ``stop``: once set, the job stops at its next
    commit (:class:`~blipserve.errors.JobStopped`; a hosted job canceled).
    """
    try:  # imported as Any: Ray's own annotations are partial
        ray: Any = importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError:
        raise InvalidInput("--ray needs Ray: pip install 'blipserve[ray]'") from None
    from blipserve.models import resolve_source

    filter_model = options.filter_model
    # The signature names the models as the local job's engines would: same journal.
    book = JobBook(
        options,
        resolve_source(settings.model.model),
        resolve_source(filter_model) if filter_model else None,
        stop=stop,
    )
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=settings.ray.ray_address, ignore_reinit_error=True)
    actor = {"options": options, "settings": settings}
    concurrency, num_gpus = settings.ray.concurrency, settings.ray.num_gpus
    try:
        with _ordered(ray):
            work = book.shard_work()
            if work is not None:
                _run_shards(ray, book, work, actor, concurrency, num_gpus)
            else:
                size = _rows(options)
                rows = _chunks(book.todo(), BLOCK_CHUNKS * size)
                refs = [ray.put(_table(chunk)) for chunk in rows]
                for results in _results(ray, refs, size, actor, concurrency, num_gpus):
                    book.commit(results)
    except ray.exceptions.RayError as exc:
        cause = _blipserve_cause(exc, ray.exceptions.RayError)
        if cause is None:
            raise
        raise cause from exc
    finally:
        book.close()
        if connected_here:
            ray.shutdown()  # stops a local cluster started here; only leaves a remote one
    return book.finish()


def _results(
    ray: Any, refs: list[Any], size: int, actor: dict[str, Any], concurrency: int, gpus: float
) -> Iterator[list[RowResult]]:
    """The results of the rows in ``refs`` (Arrow blocks), as they come, in input order."""
    if not refs:
        return
    dataset = ray.data.from_arrow_refs(refs).map_batches(
        RecordActor,
        fn_constructor_kwargs=actor,
        batch_size=size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=gpus,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield [_result(line) for line in batch.column("record").to_pylist()]


def _run_shards(
    ray: Any,
    book: JobBook,
    work: list[ShardWork],
    actor: dict[str, Any],
    concurrency: int,
    gpus: float,
) -> None:
    """Each shard in ``work`` read, captioned (and its output shard written) by one actor;
    the results committed here in input order, each shard's end told to ``book``."""
    if not work:
        return
    items = [{"work": json.dumps(dataclasses.asdict(w))} for w in work]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardActor,
        fn_constructor_kwargs=actor,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=gpus,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        results: list[RowResult] = []
        lines = batch.column("record").to_pylist()
        ends = batch.column("end_of_shard").to_pylist()
        for line, end in zip(lines, ends, strict=True):
            if end is None:
                results.append(_result(line))
                continue
            book.commit(results)
            results = []
            book.shard_read(ShardEnd(**end))
        if results:
            book.commit(results)


@contextlib.contextmanager
def _ordered(ray: Any) -> Iterator[None]:
    """Ray Data in input order (the journal, so the output, reads like a local run's) and
    without its own progress bars; the context is restored after."""
    with warnings.catch_warnings():  # Ray's first DataContext warns about its own defaults
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


class ModelActor:
    """A model actor: the engine (and CapFilt's matching engine) loaded once."""

    def __init__(self, *, options: BatchOptions, settings: Settings) -> None:
        from blipserve.engine import Engine

        self.options = options
        self.engine = Engine.from_settings(settings)
        self.filter_engine = (
            Engine.from_settings(settings, model=options.filter_model)
            if options.filter_model
            else None
        )


class RecordActor(ModelActor):
    """Batches of input rows in, each row's result out (a journal line, ``record``)."""

    @functools.cached_property
    def starter(self) -> RowStarter:
        return RowStarter(self.engine, self.options)

    def __call__(self, batch: Any) -> dict[str, list[str]]:
        rows = [_input_row(values) for values in batch.to_pylist()]
        try:
            chunk = [(row, self.starter.start(row)) for row in rows]
            results = make_records(self.engine, chunk, self.options, self.filter_engine)
        except StorageError:
            raise  # the store is down: the job stops (and resumes), no row is failed for it
        except Exception as exc:  # a bug fails this batch's rows, never the job
            log.exception("a batch of %d rows failed", len(rows))
            results = [RowResult.failed(row, f"{type(exc).__name__}: {exc}") for row in rows]
        return {"record": _lines(results)}


class ShardActor(ModelActor):
    """A model actor for shards: each call reads one whole shard, captions the rows not
    recorded already, yields their results a chunk at a time, writes the output shard
    (when the output is shards), then yields the shard's end: its row counts.  Each is an
    Arrow table of :func:`shard_messages`' two columns."""

    def __call__(self, batch: Any) -> Iterator[Any]:
        for line in batch.column("work").to_pylist():
            yield from self._shard(ShardWork(**json.loads(line)))

    def _shard(self, work: ShardWork) -> Iterator[Any]:
        o = self.options
        count = {"rows": 0, "skipped": 0}
        captions = dict(work.recorded)
        how = ReadOptions(text_from=o.text_from)
        source = o.locate(work.location)

        def rows() -> Iterator[InputRow]:
            for row in iter_shard(source, work.name, how):
                count["rows"] += 1
                if row.id in work.recorded:
                    count["skipped"] += 1
                else:
                    yield row

        for results in records_of(self.engine, rows(), o, self.filter_engine):
            captions.update((r.id, r.caption()) for r in results)
            yield shard_messages(results)
        if work.dest:
            write_shard(source, o.locate(work.dest), captions, o.caption_key)
        yield shard_messages(
            end=ShardEnd(work.name, count["rows"], count["skipped"], bool(work.dest))
        )


def _rows(options: BatchOptions) -> int:
    return max(1, options.chunk_rows)


def _chunks(rows: Iterable[InputRow], size: int) -> Iterator[list[InputRow]]:
    chunk: list[InputRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _table(rows: list[InputRow]) -> Any:
    import pyarrow as pa

    columns = {name: [_text(getattr(row, name)) for row in rows] for name in COLUMNS}
    # large_string: base64 images from tables can exceed a 2 GiB string column per block
    arrays = {name: pa.array(values, pa.large_string()) for name, values in columns.items()}
    arrays["data"] = pa.array([row.data for row in rows], pa.large_binary())
    return pa.table(arrays)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _input_row(values: dict[str, Any]) -> InputRow:
    fields: dict[str, Any] = {k: values.get(k) for k in (*COLUMNS, "data")}
    return InputRow(**fields)


def _lines(results: list[RowResult]) -> list[str]:
    """Results as they travel from the actors: journal lines (the journal's encoding)."""
    return [result_line(r).decode() for r in results]


def _result(line: str) -> RowResult:
    result = result_of_line(line)
    if result is None:
        raise ValueError(f"a model actor sent no row's result: {line[:200]!r}")
    return result


def shard_messages(results: list[RowResult] | None = None, end: ShardEnd | None = None) -> Any:
    """What a :class:`ShardActor` sends, as an Arrow table: ``results`` (their journal
    lines, column ``record``), or a shard's ``end`` (column ``end_of_shard``); in each row
    one of the two is null."""
    import pyarrow as pa

    lines: list[str | None] = list(_lines(results or []))
    ends: list[dict[str, Any] | None] = [None] * len(lines)
    if end is not None:
        lines.append(None)
        ends.append(dataclasses.asdict(end))
    return pa.table({"record": lines, "end_of_shard": ends}, schema=_shard_schema())


@functools.cache
def _shard_schema() -> Any:
    import pyarrow as pa

    end = pa.struct(
        [
            ("name", pa.string()),
            ("rows", pa.int64()),
            ("skipped", pa.int64()),
            ("written", pa.bool_()),
        ]
    )
    return pa.schema([("record", pa.large_string()), ("end_of_shard", end)])


def _blipserve_cause(exc: BaseException, wrapper: type[BaseException]) -> BaseException | None:
    """The blipserve error behind Ray's wrappers (e.g. a model actor that could not load its
    model: ActorDiedError(RayTaskError(cause=ModelLoadError))), for the CLI to report."""
    todo, seen = [exc], set()
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue  # Ray's errors can be their own __cause__
        seen.add(id(error))
        if isinstance(error, BlipserveError) and not isinstance(error, wrapper):
            return error
        linked = (getattr(error, "cause", None), error.__cause__, *error.args)
        todo.extend(e for e in linked if isinstance(e, BaseException))
    return None
