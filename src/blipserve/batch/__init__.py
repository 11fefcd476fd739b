"""Batch jobs: the same engine over folders, tables, lists and WebDataset shards, on a
local disk or in object storage, resumable, locally or on Ray.

``blipserve.batch.runner`` (the job: an engine and a book), ``book`` (the driver's side:
the rows to do, each finished one to its parts), ``rows`` (InputRow, RowResult),
``progress`` (counts, --max-failures), ``capfilt``, ``options``, ``storage`` (local paths
and object stores via fsspec), ``sources`` (inputs), ``shards`` (WebDataset), ``sinks``
(outputs, sidecars), ``journal`` (resume), ``ray`` (Ray Data).
Import what you need from those modules; this package imports nothing heavy itself, so
the CLI stays quick to start.
"""
