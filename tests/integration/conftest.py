"""Real `blipserve serve` processes: see tests/live_server.py and the fixtures
(``server_factory``, ``controllable_model``) in tests/conftest.py, shared with
tests/hardening; and the server the `openai` client's tests share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from live_server import OPENAI_KEY, openai_client_of
from testkit.live_server import RunningServer


@pytest.fixture(scope="session")
def openai_server(
    server_factory: Callable[..., RunningServer], tiny_model_dir: dict[str, Path]
) -> RunningServer:
    """The tiny BLIP-2 OPT behind an API key (``OPENAI_KEY``)."""
    return server_factory(tiny_model_dir["blip2-opt"], "--api-key", OPENAI_KEY)


@pytest.fixture(scope="session")
def openai_client(openai_server: RunningServer) -> openai.OpenAI:
    return openai_client_of(openai_server)
