"""Helpers shared by the tests (``tests/``) and the benchmarks (``bench/``), not shipped.

* :mod:`testkit.live_server`: real server processes on free ports, polled until ready;
* :mod:`testkit.photos`: ordinary photographs (scikit-image's and scikit-learn's samples);
* :mod:`testkit.models`: random-weight models shaped like the published checkpoints;
* :mod:`testkit.stats`: percentiles;
* :mod:`testkit.env`: the environment of a quiet, offline local Ray cluster.

pytest finds the package through ``pythonpath`` in pyproject.toml; the benchmarks put the
repository's root on ``sys.path``.
"""
