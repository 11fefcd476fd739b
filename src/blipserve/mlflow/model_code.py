"""The file MLflow runs to get the pyfunc model when it loads a saved one (MLflow's
"models from code": the model is this code and its artifacts, nothing is pickled).
:func:`blipserve.mlflow.save_model` copies it into the model; it is not imported by
blipserve itself."""

from mlflow.models import set_model

from blipserve.mlflow.pyfunc import BlipserveModel

set_model(BlipserveModel())
