"""Shared fixtures: tiny models built once per session, real servers on free ports."""

from __future__ import annotations

import os

# No test may reach the Hugging Face Hub: the loading path must work offline. Set before
# transformers / huggingface_hub are imported, since they read these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import stores
import tiny_models
from live_server import RunningServer, start_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only when asked for (``-m slow``; scripts/hardening.sh)."""
    if config.getoption("markexpr"):
        return  # an explicit -m decides
    skip = pytest.mark.skip(reason="slow: run with -m slow (scripts/hardening.sh)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """kind -> folder of a tiny random model saved with save_pretrained (built on first use)."""
    return tiny_models.LazyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def engine(tiny_model_dir: dict[str, Path]) -> Iterator[Any]:
    """The tiny random BLIP captioner in an engine of batch 4 (batch-job tests)."""
    from blipserve.config import EngineConfig, ModelConfig
    from blipserve.engine import Engine

    with Engine.load(
        ModelConfig(model=str(tiny_model_dir["blip-caption"])),
        config=EngineConfig(max_batch_size=4),
    ) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def controllable_model(
    tiny_model_dir: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny BLIP captioner under the test launcher's controllable architecture
    (tests/integration/serve_controllable.py: ``sleep:S`` and ``boom`` texts)."""
    dest = tmp_path_factory.mktemp("controllable") / "model"
    shutil.copytree(tiny_model_dir["blip-caption"], dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = ["ControllableBlipForConditionalGeneration"]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="session")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RunningServer]]:
    """``factory(model, *flags)``: a started, ready server; killed at the end of the session."""
    started: list[RunningServer] = []

    def factory(model: Path, *args: str) -> RunningServer:
        server = start_server(model, tmp_path_factory.mktemp("server"), *args)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="session", params=["azure", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[stores.Emulator]:
    """A running object-store emulator (Azurite, or moto's S3 server) on a free loopback
    port.  Where it cannot run the test is skipped, except in CI, where that fails."""
    kind = request.param
    why = stores.available(kind)
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{kind} emulator unavailable in CI: {why}")
        pytest.skip(why)
    emulator = stores.start_emulator(kind, tmp_path_factory.mktemp(f"store-{kind}"))
    yield emulator
    emulator.stop()
