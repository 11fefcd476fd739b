"""The request path, one stage a module, shared by every entry point:

0. :mod:`~blipserve.engine.prompt` — the text each row gives the model, from the client's
   text, question or conversation;
1. :mod:`~blipserve.engine.prepare` — fetch and decode each row's image, check its text
   (a bad row becomes its own error);
2. group rows into batches of compatible rows: :mod:`~blipserve.engine.offline_plan` for
   rows known at once (the CLI, batch jobs), :mod:`~blipserve.engine.online_queue` for
   rows of concurrent requests (the server);
3. :mod:`~blipserve.engine.run` — run each batch through the model adapter;
4. :mod:`~blipserve.engine.results` — outcomes back in row order: all predictions or the
   first error, where a request is answered as a whole.

:class:`Engine` (:mod:`~blipserve.engine.core`) chains them for a list of rows;
:class:`OnlineEngine` (:mod:`~blipserve.engine.online`) puts the queue in front of it
for the server.
"""

from blipserve.engine.core import Engine
from blipserve.engine.prepare import PreparedRow
from blipserve.engine.prompt import PromptForm, prompt_of
from blipserve.engine.results import good_rows_or_raise, predictions_or_raise
from blipserve.engine.run import (
    default_batch_size,
    default_decode_workers,
    default_model_workers,
)

__all__ = [
    "Engine",
    "PreparedRow",
    "PromptForm",
    "default_batch_size",
    "default_decode_workers",
    "default_model_workers",
    "good_rows_or_raise",
    "predictions_or_raise",
    "prompt_of",
]
