"""blipserve models as MLflow pyfunc models, as the Azure ML catalog packages BLIP.

:func:`save_model` / :func:`log_model` (and ``blipserve export mlflow``) write an MLflow
model whose ``predict`` runs blipserve's engine on a DataFrame of the catalog's columns
(``image``, optional ``text``) and answers ``text`` per row; ``mlflow models serve``, Azure
ML's no-code deployment and ``mlflow.pyfunc.load_model`` all serve it.  Needs the
``mlflow`` extra (``pip install 'blipserve[mlflow]'``); without it, importing this package
works and the functions say what to install.

>>> from blipserve.mlflow import save_model                         # doctest: +SKIP
>>> save_model("blip-demo", "demo")                                 # doctest: +SKIP
"""

from blipserve.mlflow.export import EXTRA, log_model, model_folder, save_model

__all__ = ["EXTRA", "log_model", "model_folder", "save_model"]
