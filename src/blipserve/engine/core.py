"""The engine: rows in, outcomes out, in order. Every entry point uses this one object.

:meth:`Engine.predict` chains the stages for a list of rows (prepare, plan, run);
:meth:`Engine.score` answers a catalog request, raising on the first bad row.  The online
path (a queue merging concurrent requests) is :class:`~blipserve.engine.online.OnlineEngine`
over the same object.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from blipserve.config import EngineConfig, FetchConfig, ImageLimits, ModelConfig, Settings
from blipserve.contracts.catalog import ScoringRequest
from blipserve.engine.prepare import PreparedRow, RowPreparer
from blipserve.engine.results import good_rows_or_raise, predictions_or_raise
from blipserve.engine.run import (
    ModelRunner,
    default_batch_size,
    default_decode_workers,
    default_model_workers,
)
from blipserve.engine.trace import RequestTrace
from blipserve.errors import InvalidInput, InvalidRequest, RowError
from blipserve.models import build_model
from blipserve.models.protocol import Adapter
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Outcome, Prediction, RowInput

log = logging.getLogger(__name__)


class Engine:
    """Runs a loaded model adapter over rows of images and optional text.

    >>> engine = Engine.load(ModelConfig(model="demo"))          # doctest: +SKIP
    >>> engine.predict([RowInput(0, "examples/scene-01.png")], allow_paths=True)  # doctest: +SKIP
    [Prediction(text='a small purple square', score=None)]
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
        self.decode_workers = self.config.decode_workers or default_decode_workers(adapter.device)
        self.preparer = RowPreparer(
            adapter, self.limits, fetch or FetchConfig(), self.decode_workers
        )
        self.runner = ModelRunner(
            adapter,
            max_batch_size=self.max_batch_size,
            model_workers=self.model_workers,
            torch_threads=self.torch_threads,
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
        return cls(build_model(model), config=config, limits=limits, fetch=fetch)

    @classmethod
    def from_settings(cls, settings: Settings, *, model: str | None = None) -> Engine:
        """The engine ``settings`` describe; ``model`` replaces ``settings.model.model`` (a
        batch job's CapFilt model loads as its captioning model does)."""
        model_config = settings.model
        if model is not None:
            model_config = dataclasses.replace(model_config, model=model)
        return cls.load(
            model_config, config=settings.engine, limits=settings.images, fetch=settings.fetch
        )

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
        if self.adapter.static_cache:
            sizes, params = _powers_of_two_to(self.max_batch_size), GenerationParams()
        for size in sizes:
            started = time.perf_counter()
            predictions_or_raise(self.predict([row] * size, params))
            log.info("warm-up (%d rows) took %.2f s", size, time.perf_counter() - started)

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        """Threads for :meth:`prepare` (fetching and decoding), shared with the online path."""
        return self.preparer.pool

    def close(self) -> None:
        self.preparer.close()
        self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_params(self, params: GenerationParams) -> None:
        """Refuse parameters this model cannot honour, once for a whole request or job (a
        400 naming the parameter, before any image is fetched), rather than row by row."""
        try:
            self.adapter.check_params(params)
        except InvalidInput as exc:
            raise InvalidRequest(exc.message) from None

    # -- the stages, each usable on its own ----------------------------------------------

    def prepare(
        self,
        row: RowInput,
        params: GenerationParams,
        *,
        allow_paths: bool = False,
        trace: RequestTrace | None = None,
    ) -> PreparedRow:
        """Stage 1: fetch and decode the row's image, check its text (or raise RowError)."""
        return self.preparer.prepare(row, params, allow_paths=allow_paths, trace=trace)

    def admit(self, row: RowInput, item: ModelInput) -> PreparedRow:
        """Stage 1 for a row decoded already (CapFilt's caption pairs): the model's check
        of it, and its batch key (or raise RowError)."""
        return self.preparer.admit(row, item)

    def prepare_all(
        self, rows: Iterable[RowInput], params: GenerationParams, *, allow_paths: bool = False
    ) -> list[PreparedRow | RowError]:
        """Stage 1 for many rows, concurrently; bad rows come back as their error."""
        return self.preparer.prepare_all(rows, params, allow_paths=allow_paths)

    def run_batch(self, items: Sequence[ModelInput], *, helper: bool = False) -> list[Prediction]:
        """Stage 3: one batch of rows that share a key (the online queue's model call)."""
        return self.runner.run_batch(items, helper=helper)

    def run_prepared(self, prepared: Sequence[PreparedRow | RowError]) -> list[Outcome]:
        """Stages 2 and 3: plan the good rows into batches and run them, outcomes in order."""
        return self.runner.run_prepared(prepared)

    # -- everything chained -------------------------------------------------------------

    def predict(
        self,
        rows: Sequence[RowInput],
        params: GenerationParams | None = None,
        *,
        allow_paths: bool = False,
    ) -> list[Outcome]:
        """Predict every row; a bad row's outcome is its :class:`RowError`.  Parameters the
        model cannot honour raise :class:`InvalidRequest` (:meth:`check_params`)."""
        params = params or GenerationParams()
        self.check_params(params)
        return self.run_prepared(self.prepare_all(rows, params, allow_paths=allow_paths))

    def score(self, request: ScoringRequest) -> list[Prediction]:
        """Answer a catalog scoring request; raise if any row is bad (nothing is run then)."""
        self.check_params(request.params)
        good = good_rows_or_raise(self.prepare_all(request.rows, request.params))
        return predictions_or_raise(self.run_prepared(good))


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
