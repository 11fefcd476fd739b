"""The MLflow pyfunc model: blipserve's engine behind ``mlflow.pyfunc.load_model`` and
``mlflow models serve``.  Imported by MLflow when it loads a saved model, and by
:mod:`blipserve.mlflow.export` when it saves one; it needs the ``mlflow`` extra."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel

from blipserve.contracts.catalog import ScoringRequest
from blipserve.engine import Engine
from blipserve.errors import BlipserveError
from blipserve.mlflow.tables import (
    frame_columns,
    frame_records,
    params_from_request,
    rows_from_frame,
    settings_from_config,
)

log = logging.getLogger(__name__)

#: the name of the artifact that holds the model's files (a ``save_pretrained`` folder)
MODEL_ARTIFACT = "model"


class BlipserveModel(PythonModel):
    """A BLIP / BLIP-2 model served by blipserve's :class:`~blipserve.engine.Engine`.

    ``predict`` takes a DataFrame with an ``image`` column (base64 text, an http(s) URL or
    image bytes) and an optional ``text`` column, and answers a DataFrame with ``text``
    (plus ``score`` for image-text matching, ``texts`` when a row asks for several), one
    row per input row, in order.  The rows go through the engine as a ``/score``
    request's do: decoded concurrently, checked, batched by ``max_batch_size``.  A bad row
    fails the whole call with an ``MlflowException`` (``INVALID_PARAMETER_VALUE``: HTTP 400
    from MLflow's scoring server) whose message names the row.

    >>> model = mlflow.pyfunc.load_model("blip-demo")                  # doctest: +SKIP
    >>> model.predict(pd.DataFrame({"image": [base64_png]}), params={"num_beams": 3})
    ...                                                                 # doctest: +SKIP
                         text
    0   a small purple square
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        settings = settings_from_config(config, context.artifacts[MODEL_ARTIFACT])
        log.info("loading %s from the MLflow model", config.get("source", "the model"))
        self.engine = Engine.from_settings(settings)
        self.engine.warm_up()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        engine = self.engine
        if engine is None:
            raise MlflowException("the model is not loaded (load_context was not called)")
        if not isinstance(model_input, pd.DataFrame):
            raise MlflowException(
                f"the input must be a DataFrame, got {type(model_input).__name__}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        try:
            generation = params_from_request(params)
            rows = rows_from_frame(model_input)
            predictions = engine.score(ScoringRequest(rows, generation))
        except BlipserveError as exc:
            code = INVALID_PARAMETER_VALUE if exc.status == 400 else INTERNAL_ERROR
            raise MlflowException(exc.message, error_code=code) from exc
        columns = frame_columns(engine.adapter.text_role, generation)
        return pd.DataFrame(frame_records(predictions, columns), columns=columns)
