"""Real `blipserve serve` processes: see tests/live_server.py and the fixtures
(``server_factory``, ``controllable_model``) in tests/conftest.py, shared with
tests/hardening."""

from __future__ import annotations

from live_server import LAUNCHER, RunningServer, start_server

__all__ = ["LAUNCHER", "RunningServer", "start_server"]
