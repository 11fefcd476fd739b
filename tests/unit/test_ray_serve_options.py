"""blipserve.ray_serve without a cluster: Serve's options from blipserve's settings, the
application builder's arguments, the proxy's and the replica's middlewares, replica
health, and the Serve config file in deploy/ray.  (tests/integration/test_ray_serve.py
runs real replicas.)"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from blipserve.config import EngineConfig, RayConfig, ReplicaConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.engine.online import OnlineEngine
from blipserve.errors import InvalidInput
from blipserve.ray_serve import (
    DEPLOYMENT_NAME,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    PROXY_DEADLINE_MARGIN_S,
    AnsweredBy,
    ReplicaLost,
    Stopping,
    build,
    deployment_options,
    proxy_http_options,
    replica_settings,
    settings_from_mapping,
)
from blipserve.server.app import ServerState
from fakes import EchoAdapter

pytest.importorskip("ray.serve")
from ray.serve.config import HTTPOptions
from ray.serve.schema import ServeDeploySchema

SERVE_CONFIG = Path(__file__).parents[2] / "deploy" / "ray" / "blipserve-serve.yaml"
RAYSERVICE = Path(__file__).parents[2] / "deploy" / "kubernetes" / "rayservice.yaml"


def test_a_cpu_replica_takes_four_batches_and_drains_for_the_graceful_timeout() -> None:
    options = deployment_options(Settings(server=ServerConfig(graceful_timeout_s=12)))
    assert options["name"] == DEPLOYMENT_NAME
    assert options["num_replicas"] == 1
    assert "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 32  # 4 x the CPU's batch of 8
    assert options["graceful_shutdown_timeout_s"] == 12
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert options["max_queued_requests"] == ServerConfig().max_queue
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    assert options["logging_config"] == {"encoding": "TEXT", "log_level": "INFO"}
    json_logs = deployment_options(Settings(server=ServerConfig(log_format="json")))
    assert json_logs["logging_config"]["encoding"] == "JSON"


def test_gpus_autoscaling_and_explicit_limits() -> None:
    gpu = deployment_options(Settings(ray=RayConfig(num_gpus=1), replicas=ReplicaConfig()))
    assert gpu["max_ongoing_requests"] == 256  # 4 x the GPU's batch of 64
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    scaled = deployment_options(
        Settings(
            engine=EngineConfig(max_batch_size=4),
            replicas=ReplicaConfig(autoscale=(0, 3), num_cpus=2),
        )
    )
    assert "num_replicas" not in scaled
    assert scaled["max_ongoing_requests"] == 16
    config = scaled["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"]) == (0, 3)
    assert config["initial_replicas"] == 1  # a cluster with none could answer nothing
    assert config["target_ongoing_requests"] == 8
    fixed = deployment_options(Settings(replicas=ReplicaConfig(max_ongoing_requests=5)))
    assert fixed["max_ongoing_requests"] == 5


def test_replicas_and_autoscale_are_one_or_the_other() -> None:
    with pytest.raises(ValueError, match="--replicas or --autoscale"):
        ReplicaConfig(replicas=2, autoscale=(1, 4))
    for bad in ("4", "3:1", "a:b", "0:0", "-1:2"):
        with pytest.raises(InvalidInput, match="expected MIN:MAX"):
            settings_from_mapping({"autoscale": bad})


def test_torch_runs_on_the_cpus_ray_reserved_unless_told() -> None:
    half = Settings(replicas=ReplicaConfig(num_cpus=1.5))
    assert replica_settings(half).engine.torch_threads == 2
    told = Settings(engine=EngineConfig(torch_threads=1), replicas=ReplicaConfig(num_cpus=4))
    assert replica_settings(told).engine.torch_threads == 1


def test_application_args_are_options_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPSERVE_MAX_QUEUE", "64")
    monkeypatch.setenv("BLIPSERVE_MAX_BATCH_SIZE", "2")
    settings = settings_from_mapping(
        {
            "model": "demo-vqa",
            "max-batch-size": 4,  # as YAML gives numbers, and with dashes like a flag
            "autoscale": "1:3",
            "api_keys": ["k1", "k2"],
            "warmup": False,
            "num_gpus": "0.5",
        }
    )
    assert settings.model.model == "demo-vqa"
    assert settings.engine.max_batch_size == 4  # the argument wins over the variable
    assert settings.server.max_queue == 64  # the variable still counts
    assert settings.replicas.autoscale == (1, 3)
    assert settings.server.api_keys == ("k1", "k2")
    assert settings.server.warmup is False
    assert settings.ray.num_gpus == 0.5
    with pytest.raises(InvalidInput, match="unknown blipserve option 'modle'"):
        settings_from_mapping({"modle": "demo"})
    with pytest.raises(InvalidInput, match="option 'max_batch_size': expected an integer"):
        settings_from_mapping({"max_batch_size": "many"})


def test_the_serve_config_file_is_valid_and_builds() -> None:
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)  # Serve's own check of the file
    [application] = schema.applications
    assert application.import_path == "blipserve.ray_serve:app"
    settings = settings_from_mapping(application.args)
    assert settings.replicas.autoscale == (1, 4)
    bound = build(settings)  # what `serve run` does with it, short of a cluster
    assert bound._bound_deployment.name == DEPLOYMENT_NAME


def asgi(app: Any, scope_type: str = "http") -> list[dict[str, Any]]:
    """The messages ``app`` sends for one request."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app({"type": scope_type, "path": "/score", "headers": []}, receive, send))
    return sent


def test_a_request_no_replica_answered_gets_a_503_with_retry_after() -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None  # as Serve's proxy does when the replica holding the request died

    start, body = asgi(ReplicaLost(silent))
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == b"1"
    assert "retry" in json.loads(body["body"])["message"]

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("the proxy itself failed")

    assert asgi(ReplicaLost(broken))[0]["status"] == 503

    async def proxy_deadline(scope: Any, receive: Any, send: Any) -> None:
        # what Serve's proxy sends when no replica answered by its request_timeout_s
        await send({"type": "http.response.start", "status": 408, "headers": []})
        await send({"type": "http.response.body", "body": b"Request abc timed out after 65s."})

    assert asgi(ReplicaLost(proxy_deadline)) == asgi(ReplicaLost(silent))


def test_the_proxy_gives_up_on_a_request_after_the_app_would() -> None:
    server = ServerConfig(host="127.0.0.1", request_timeout_s=20)
    options = proxy_http_options(server, 8123)
    assert options == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 25.0}
    HTTPOptions(**options)  # Serve's own model of them
    # the deploy files: past the app's deadline, which they leave at its default
    rayservice = yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"]
    for config in (yaml.safe_load(SERVE_CONFIG.read_text()), yaml.safe_load(rayservice)):
        timeout = config["http_options"]["request_timeout_s"]
        assert timeout == ServerConfig().request_timeout_s + PROXY_DEADLINE_MARGIN_S
        for application in config["applications"]:
            env = application.get("runtime_env", {}).get("env_vars", {})
            assert "BLIPSERVE_REQUEST_TIMEOUT_S" not in env
            assert "request_timeout_s" not in application.get("args", {})


def test_answers_pass_through_the_proxy_middleware_untouched() -> None:
    async def replica_error(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"message": "model failed"}'})

    assert asgi(ReplicaLost(replica_error)) == asgi(replica_error)

    async def dies_mid_stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("replica died")

    with pytest.raises(RuntimeError):
        asgi(ReplicaLost(dies_mid_stream))


def test_each_answer_names_its_replica_and_leaves_the_request_id_to_the_proxy() -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"a", b"b"), (b"x-request-id", b"r-1"), (b"x-ms-request-id", b"r-1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"[]"})

    start, _ = asgi(AnsweredBy(ok, replica="r1"))
    assert start["headers"] == [
        (b"a", b"b"),
        (b"x-ms-request-id", b"r-1"),
        (b"x-blipserve-replica", b"r1"),
    ]


def test_replica_health_follows_the_server_state() -> None:
    state = ServerState(Settings())
    assert state.health_problem() == "the model is still loading"
    state.load_error = "ModelLoadError: no such model"
    assert state.health_problem() == "the model failed to load: ModelLoadError: no such model"
    state = ServerState(Settings(server=ServerConfig(warmup=False)))
    state.load(Engine(EchoAdapter(), config=EngineConfig(max_batch_size=2)))
    assert state.health_problem() is None
    assert isinstance(state.online, OnlineEngine)
    state.online.queue.stop(timeout=5)  # the model thread is gone
    assert state.health_problem() == "the model thread is not running"
    state.shutdown()


def test_every_cluster_file_names_the_real_proxy_middleware() -> None:
    """The variable's value in deploy/ and the docs is the callback, and it answers with the
    middleware (a typo would leave proxies answering bare 500s, silently)."""
    module, _, name = PROXY_CALLBACK.partition(":")
    middlewares = getattr(importlib.import_module(module), name)()
    assert [m.cls for m in middlewares] == [ReplicaLost]
    root = Path(__file__).parents[2]
    files = [*root.glob("deploy/**/*.y*ml"), *root.glob("docs/*.md")]
    values = [
        value
        for path in files
        for value in re.findall(rf"{PROXY_CALLBACK_ENV}(?:=|\s+value: )([\w.:]+)", path.read_text())
    ]
    assert len(values) >= 4  # the Serve config, the RayService's head and workers, the docs'
    assert set(values) == {PROXY_CALLBACK}


def test_a_stop_signal_interrupts_loading_then_only_sets_the_flag() -> None:
    stopping = Stopping()
    with pytest.raises(Stopping.Requested):  # serve.run waits for replicas: leave it
        stopping.handle(signal.SIGTERM, None)
    assert stopping.requested
    stopping = Stopping()
    stopping.deployed = True
    stopping.handle(signal.SIGINT, None)  # the main loop sees it and drains
    assert stopping.requested
