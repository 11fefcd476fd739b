"""The HTTP layer: routes over the online engine (:mod:`blipserve.engine.online`).

- :mod:`~blipserve.server.app`: the FastAPI app and its routes, each a few lines that
  parse with :mod:`blipserve.contracts`, call the engine and encode;
- :mod:`~blipserve.server.http`: bodies, auth, disconnects, request ids, and the one
  place typed errors become responses;
- :mod:`~blipserve.server.open_inference`: KServe's Open Inference Protocol (``/v2``),
  on the same engine;
- :mod:`~blipserve.server.openapi`, :mod:`~blipserve.server.metrics`: ``/swagger.json``
  and ``/metrics``;
- :mod:`~blipserve.server.docs`: ``/docs``, Swagger UI served from installed files;
- :mod:`~blipserve.server.run`: ``blipserve serve`` under uvicorn.
"""

from blipserve.server.app import create_app
from blipserve.server.run import serve

__all__ = ["create_app", "serve"]
