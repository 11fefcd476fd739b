"""The engine: rows in, predictions out, in order. Every entry point uses this one object.

Stages, each usable on its own (the HTTP batcher and batch jobs call them separately):

1. :meth:`Engine.prepare` — fetch/decode a row's image and check its text, in a pool of
   threads; a bad row becomes a :class:`RowError`, never a failed batch.
2. :meth:`Engine.batch_key` — rows with equal keys may share a model call.
3. :meth:`Engine.run_batch` — one compatible batch through the adapter, under
   ``torch.inference_mode`` on one model thread at a time.

:meth:`Engine.predict` chains them for a list of rows; :meth:`Engine.score` answers a
catalog request, raising on the first bad row.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from blipserve.batching import plan_batches
from blipserve.config import EngineConfig, FetchConfig, ImageLimits, ModelConfig
from blipserve.contract import Prediction, RowInput, ScoringRequest
from blipserve.errors import BlipserveError, InferenceError, InvalidInput, RowError
from blipserve.fetch import SafeFetcher
from blipserve.images import load_image
from blipserve.models import load_model
from blipserve.models.base import Adapter, ModelInput
from blipserve.params import GenerationParams

log = logging.getLogger(__name__)

#: what one row became: its prediction, its own error, or its batch's model failure
Outcome = Prediction | RowError | InferenceError


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


class Engine:
    """Runs a loaded model adapter over rows of images and optional text.

    >>> engine = Engine.load(ModelConfig(model="demo"))          # doctest: +SKIP
    >>> engine.predict([RowInput(0, "examples/scene-01.png")], allow_paths=True)  # doctest: +SKIP
    [Prediction(text='a red circle left of a blue square', score=None)]
    """

    def __init__(
        self,
        adapter: Adapter,
        *,
        config: EngineConfig | None = None,
        limits: ImageLimits | None = None,
        fetch: FetchConfig | None = None,
    ) -> None:
        self.adapter = adapter
        self.config = config or EngineConfig()
        self.max_batch_size = self.config.max_batch_size or default_batch_size(adapter.device)
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)  # process-wide, as torch has it
        self.torch_threads = torch.get_num_threads()
        self.model_workers = self.config.model_workers or default_model_workers(
            adapter.device, self.torch_threads, adapter.vision_backend
        )
        self.limits = limits or ImageLimits()
        fetch = fetch or FetchConfig()
        self.fetcher = SafeFetcher(fetch) if fetch.allow_urls else None
        self._decode_pool = ThreadPoolExecutor(
            max_workers=self.config.decode_workers, thread_name_prefix="blipserve-decode"
        )
        # At most model_workers batches at once (inference keeps no state in the model, and
        # int8 scratch buffers are per thread), sharing the torch threads while they overlap.
        self._model_slots = threading.BoundedSemaphore(self.model_workers)
        self._busy_lock = threading.Lock()
        self._helpers_active = 0  # helper threads of run_prepared taking batches now
        self._model_pool = ThreadPoolExecutor(
            max_workers=max(1, self.model_workers - 1), thread_name_prefix="blipserve-model"
        )

    @classmethod
    def load(
        cls,
        model: ModelConfig,
        *,
        config: EngineConfig | None = None,
        limits: ImageLimits | None = None,
        fetch: FetchConfig | None = None,
    ) -> Engine:
        return cls(load_model(model), config=config, limits=limits, fetch=fetch)

    def warm_up(self) -> None:
        """Run one synthetic image through the model (first-call costs paid before serving).

        With ``--cuda-graphs`` a batch of each size the adapter pads to (powers of two, and
        ``max_batch_size``) and the model's default caption length: each compiles its
        decoding step on first use (seconds to tens of seconds), which would otherwise
        stall the first requests of that size.
        """
        image = base64.b64encode(_warmup_png()).decode()
        text = "what is this?" if self.adapter.text_required else None
        row = RowInput(0, image, text)
        sizes, params = [1], GenerationParams(max_new_tokens=2)
        if getattr(self.adapter, "static_cache", False):
            sizes, params = _powers_of_two_to(self.max_batch_size), GenerationParams()
        for size in sizes:
            started = time.perf_counter()
            outcomes = self.predict([row] * size, params)
            bad = [o for o in outcomes if not isinstance(o, Prediction)]
            if bad:
                raise bad[0]
            log.info("warm-up (%d rows) took %.2f s", size, time.perf_counter() - started)

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        """Threads for :meth:`prepare` (fetching and decoding), shared with the server."""
        return self._decode_pool

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._model_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stage 1: decode and check ------------------------------------------------------

    def prepare(
        self, row: RowInput, params: GenerationParams, *, allow_paths: bool = False
    ) -> PreparedRow:
        """Fetch and decode the row's image and check its text; raise :class:`RowError`."""
        try:
            if row.text is None and self.adapter.text_required:
                raise InvalidInput(_TEXT_NEEDED.get(self.adapter.text_role, "'text' is required"))
            image = load_image(
                row.image,
                limits=self.limits,
                fetcher=self.fetcher,
                target_size=self.adapter.image_size,
                allow_paths=allow_paths,
            )
            item = ModelInput(image=image, text=row.text, params=params)
            return PreparedRow(row, item, self.adapter.batch_key(item))
        except RowError:
            raise
        except InvalidInput as exc:
            raise RowError(row.position, exc.message, row.index) from exc

    def prepare_all(
        self, rows: Iterable[RowInput], params: GenerationParams, *, allow_paths: bool = False
    ) -> list[PreparedRow | RowError]:
        """:meth:`prepare` every row concurrently; bad rows come back as their error."""
        futures = [
            self._decode_pool.submit(self.prepare, row, params, allow_paths=allow_paths)
            for row in rows
        ]
        out: list[PreparedRow | RowError] = []
        for future in futures:
            try:
                out.append(future.result())
            except RowError as exc:
                out.append(exc)
        return out

    # -- stage 3: the model ---------------------------------------------------------------

    @contextlib.contextmanager
    def _model_slot(self, helper: bool) -> Iterator[None]:
        """Wait for a free model slot; run with this thread's share of the torch threads.

        torch's intra-op thread count is per calling thread (OpenMP's).  Helpers (the
        extra model workers of :meth:`run_prepared`) always run on one: a thread that has
        run a parallel region keeps its OpenMP team, and once a process holds more team
        threads than cores, libgomp stops spinning at barriers for every team -- one image
        on its own then took 0.85 s instead of 0.6 s, for the same CPU time.  The calling
        thread takes what the busy helpers leave.
        """
        with self._model_slots:
            with self._busy_lock:
                share = 1 if helper else max(1, self.torch_threads - self._helpers_active)
            before = torch.get_num_threads()
            if self.model_workers > 1 and before != share:
                torch.set_num_threads(share)
            try:
                yield
            finally:
                if torch.get_num_threads() != before:  # (the caller's thread, as it was)
                    torch.set_num_threads(before)

    def run_batch(self, items: Sequence[ModelInput], *, helper: bool = False) -> list[Prediction]:
        """Run rows that share a batch key; raise :class:`InferenceError` if the model fails.

        Safe to call from several threads: at most ``model_workers`` batches run at once
        (``helper``: on one torch thread, see :meth:`_model_slot`).
        """
        with self._model_slot(helper), torch.inference_mode():
            try:
                predictions = self.adapter.predict(items)
            except BlipserveError:
                raise
            except Exception as exc:
                log.exception("model failed on a batch of %d rows", len(items))
                raise InferenceError(f"the model failed on this batch: {exc}") from exc
        if len(predictions) != len(items):
            raise InferenceError(
                f"the model returned {len(predictions)} results for {len(items)} rows"
            )
        return predictions

    # -- everything chained -------------------------------------------------------------

    def run_prepared(self, prepared: Sequence[PreparedRow | RowError]) -> list[Outcome]:
        """Batch the good rows by key, run them, and return outcomes in input order.

        A failing batch fails only its own rows, each with the :class:`InferenceError`.
        """
        outcomes: dict[int, Outcome] = {
            i: p for i, p in enumerate(prepared) if isinstance(p, RowError)
        }
        good = [(i, p) for i, p in enumerate(prepared) if isinstance(p, PreparedRow)]
        batches = [
            [good[j] for j in batch]
            for batch in plan_batches([p.key for _, p in good], self.max_batch_size)
        ]

        todo = deque(batches)
        taking = threading.Lock()

        def drain(helper: bool) -> None:
            # This thread takes the next batch until none is left.
            try:
                while True:
                    with taking:
                        if not todo:
                            return
                        members = todo.popleft()
                    try:
                        results: Sequence[Outcome] = self.run_batch(
                            [p.item for _, p in members], helper=helper
                        )
                    except InferenceError as exc:
                        results = [exc] * len(members)
                    for (i, _), result in zip(members, results, strict=True):
                        outcomes[i] = result
            finally:
                if helper:
                    with self._busy_lock:
                        self._helpers_active -= 1

        # Extra model workers join in when there is more than one batch; the caller's
        # thread works too, on the torch threads they leave.
        helpers = max(0, min(self.model_workers, len(batches)) - 1)
        with self._busy_lock:  # counted from now, so that the caller leaves them threads
            self._helpers_active += helpers
        futures = [self._model_pool.submit(drain, True) for _ in range(helpers)]
        drain(False)
        for future in futures:
            future.result()
        return [outcomes[i] for i in range(len(prepared))]

    def predict(
        self,
        rows: Sequence[RowInput],
        params: GenerationParams | None = None,
        *,
        allow_paths: bool = False,
    ) -> list[Outcome]:
        """Predict every row; a bad row's outcome is its :class:`RowError`."""
        params = params or GenerationParams()
        return self.run_prepared(self.prepare_all(rows, params, allow_paths=allow_paths))

    def score(self, request: ScoringRequest) -> list[Prediction]:
        """Answer a catalog scoring request; raise if any row is bad (nothing is run then)."""
        prepared = self.prepare_all(request.rows, request.params)
        good = raise_row_errors(prepared)
        predictions = []
        for outcome in self.run_prepared(good):
            if not isinstance(outcome, Prediction):
                raise outcome
            predictions.append(outcome)
        return predictions


def default_model_workers(device: torch.device, torch_threads: int, vision: str = "torch") -> int:
    """Batches run at once when the config leaves it to us (``model_workers`` 0).

    Measured on BLIP-base int8, 2-core Zen 4: two batches of 8 on two threads with one
    torch thread each against one after the other with two threads, images/s (medians of
    7 interleaved pairs, three runs): +13%, +3% and +9%, captions identical.  A GPU
    runs one batch at a time (CUDA graphs and the memory of two batches in flight).  So
    does a vision encoder on OpenVINO, which takes every core per call whatever the
    thread's torch share: with two workers, batch 8, 1.73 images/s against 2.06-2.24 with
    one (bench/results/speed-cpu-openvino.json, -w1.json).
    """
    if device.type != "cpu" or torch_threads < 2 or vision == "openvino":
        return 1
    return 2


def default_batch_size(device: torch.device) -> int:
    """Rows per model call when the config leaves it to us (``max_batch_size`` 0).

    Measured (README, Speed): on a 2-core CPU batching pays little past 8 rows; on an H200
    BLIP-base gave 6.7x the one-by-one throughput at 8 rows, 14.8x at 32 and 20.7x at 64,
    with 2 GiB of GPU memory at 64.  32 leaves room on smaller GPUs and larger models.
    """
    return 32 if device.type == "cuda" else 8


def _powers_of_two_to(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, then ``n`` (which pads to the next power of two)."""
    sizes = [1]
    while sizes[-1] * 2 < n:
        sizes.append(sizes[-1] * 2)
    return sizes if n <= 1 else [*sizes, n]


def _warmup_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 160, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def raise_row_errors(prepared: Sequence[PreparedRow | RowError]) -> list[PreparedRow]:
    """The rows, all good; else raise the one bad row's error, or one listing several."""
    errors = [p for p in prepared if isinstance(p, RowError)]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        shown = "; ".join(e.message for e in errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise InvalidInput(f"{len(errors)} rows are invalid: {shown}{more}")
    return [p for p in prepared if isinstance(p, PreparedRow)]
