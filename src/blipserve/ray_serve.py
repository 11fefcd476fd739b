"""The endpoint as Ray Serve replicas: ``blipserve serve --ray`` and ``serve run``.

Each replica is the same FastAPI app as ``blipserve serve`` (every route, the same engine
and dynamic batching), wrapped with ``serve.ingress``; Serve's HTTP proxy routes requests
between replicas.  What Serve needs from a replica is tied to what the app already knows:

- a replica's startup loads and warms up its engine before it reports started, so Serve
  routes nothing to a replica that would answer 503; a model that cannot load fails the
  replica's start (Serve retries, then marks the deployment unhealthy);
- its health check is the app's own (:meth:`ServerState.health_problem`): a replica whose
  model thread died is replaced;
- stopping a replica drains it: Serve stops routing to it and waits up to
  ``--graceful-timeout-s`` for its requests in flight, then the app's shutdown finishes
  what is queued.

Three ways in::

    blipserve serve --ray --replicas 2 --model demo          # a local cluster, or --ray-address
    serve run blipserve.ray_serve:app model=demo replicas=2  # Serve's own CLI
    serve run deploy/ray/blipserve-serve.yaml                # a config file (KubeRay's too)

The application builder :func:`app` takes blipserve's options by name (``model``,
``max_batch_size``, ``replicas``, ``autoscale``, ...), and reads ``BLIPSERVE_*`` variables
as the CLI does; a config file's ``deployments:`` section still overrides what it sets.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blipserve.config import PARTS, ServerConfig, Settings
from blipserve.config.fields import convert, fields_with_types
from blipserve.engine.run import default_batch_size
from blipserve.errors import InvalidInput
from blipserve.server import logs
from blipserve.server.app import ServerState, create_app

log = logging.getLogger(__name__)

#: the Serve application's and its one deployment's name
APP_NAME = "blipserve"
DEPLOYMENT_NAME = "blipserve"
#: what the CLI prints for Ray's missing parts
NEEDS_SERVE = "--ray needs Ray Serve: pip install 'blipserve[serve]'"


class BlipserveReplica:
    """One replica: builds the app (Serve runs its startup, which loads the model) and
    answers Serve's health checks from it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: ServerState | None = None
        if settings.server.log_format == "json":
            # Ray configures the replica's root logger; blipserve's own lines (each
            # request's access line, the engine's warnings) get a JSON handler of their own.
            logs.configure_package_json(settings.server.log_level)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, load_in_background=False)
        self.state = app.state.blipserve
        replica = _import("ray.serve").get_replica_context().replica_id.unique_id
        app.add_middleware(AnsweredBy, replica=replica)
        return app

    def check_health(self) -> None:
        problem = "not started" if self.state is None else self.state.health_problem()
        if problem is not None:
            raise RuntimeError(f"blipserve replica unhealthy: {problem}")


class AnsweredBy:
    """Replica middleware: ``x-blipserve-replica`` on every response names the replica
    that answered (which one was slow, or failed, is otherwise hard to tell).

    It also drops the app's ``x-request-id``: Serve's proxy passes the request's id to the
    replica (which the app echoes) and adds the same header to the response itself, so the
    client would get it twice.
    """

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (b"x-blipserve-replica", replica.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                kept = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
                message["headers"] = [*kept, self.header]
            await send(message)

        await self.app(scope, receive, send_with_replica)


class ReplicaLost:
    """Serve proxy middleware: a request that no replica answered (its replica died while
    holding it) gets a 503 with ``Retry-After``, so clients retry it.

    Serve's proxy sends nothing for such a request (it only logs "Request failed: the
    actor died"), and uvicorn then answers a bare 500. A stream whose replica dies after
    its first bytes just ends: its status is already sent.

    A request no replica answers at all meets the proxy's deadline (:func:`proxy_http_options`,
    past the app's own 504); Serve's 408 then, which blipserve never sends, becomes that 503.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = timed_out = False

        async def send_and_note(message: Message) -> None:
            nonlocal started, timed_out
            if message["type"] == "http.response.start" and message["status"] == 408:
                timed_out = True  # the proxy's deadline: answered below instead
            if timed_out:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            if started:
                raise
            log.exception("the proxy failed on a request before it answered")
        if not started:
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_REPLICA_LOST)).encode()),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _REPLICA_LOST})


_REPLICA_LOST = json.dumps(
    {"message": "no replica answered this request (the one holding it stopped); retry it"}
).encode()


#: Serve's proxies take middlewares only from this variable, read where each proxy starts:
#: set it on the cluster's nodes (``blipserve serve --ray`` does for a local cluster it
#: starts; a KubeRay manifest sets it on the head and workers)
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "blipserve.ray_serve:proxy_middlewares"


def proxy_middlewares() -> list[Middleware]:
    """The middlewares of Serve's proxies (:data:`PROXY_CALLBACK`)."""
    return [Middleware(ReplicaLost)]


#: how long past the app's own deadline Serve's proxy waits for a replica's answer
PROXY_DEADLINE_MARGIN_S = 5.0


def proxy_http_options(server: ServerConfig, port: int) -> dict[str, Any]:
    """Serve's HTTP options where blipserve starts Serve: ``request_timeout_s`` bounds a
    request no replica answers (Serve's default waits forever; once in CI a request hung
    after a replica was killed). A live replica answers 504 at ``--request-timeout-s``."""
    return {
        "host": server.host,
        "port": port,
        "request_timeout_s": server.request_timeout_s + PROXY_DEADLINE_MARGIN_S,
    }


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve's deployment options from blipserve's settings (see :class:`ReplicaConfig`)."""
    replicas, server = settings.replicas, settings.server
    batch = settings.engine.max_batch_size or default_batch_size(
        torch.device("cuda" if settings.ray.num_gpus > 0 else "cpu")
    )
    ongoing = replicas.max_ongoing_requests or 4 * batch
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": settings.ray.num_gpus},
        "max_ongoing_requests": ongoing,
        # Requests waiting in the proxy for a replica: past this, 503 + Retry-After at once
        # (as a full queue answers on one server) instead of waiting without a bound.
        "max_queued_requests": server.max_queue,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        # Draining: Serve waits for requests in flight up to the server's own drain time.
        "graceful_shutdown_timeout_s": server.graceful_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        # A model that cannot load fails every try the same way: give up after three
        # (Serve's default retries for minutes) and say so.
        "max_constructor_retry_count": 3,
        # --log-format json: Serve's replica logs as JSON, with Serve's request ids (the
        # proxy passes its id on as x-request-id, which the app answers with)
        "logging_config": {
            "encoding": "JSON" if server.log_format == "json" else "TEXT",
            "log_level": server.log_level.upper(),
        },
    }
    if replicas.autoscale is None:
        options["num_replicas"] = replicas.replicas
    else:
        low, high = replicas.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            # A model call takes hundreds of milliseconds and a replica batches what it
            # holds: aim at two batches' worth in flight, scale up after 30 s of that,
            # down only after 5 minutes (a new replica takes a minute or more to load).
            "target_ongoing_requests": max(1, ongoing // 2),
            "upscale_delay_s": 30.0,
            "downscale_delay_s": 300.0,
        }
    return options


def replica_settings(settings: Settings) -> Settings:
    """The settings a replica runs with: torch on the CPUs Ray reserved for it (unless
    ``--torch-threads`` says otherwise). (Its host and port go unused: Serve's proxy
    listens.)"""
    engine = settings.engine
    if engine.torch_threads == 0:
        engine = dataclasses.replace(engine, torch_threads=math.ceil(settings.replicas.num_cpus))
    return dataclasses.replace(settings, engine=engine)


def build(settings: Settings) -> Any:
    """The Serve application (``serve.run``'s target) for ``settings``."""
    serve = _import("ray.serve")
    ingress = serve.ingress()(BlipserveReplica)
    deployment = serve.deployment(**deployment_options(settings))(ingress)
    return deployment.bind(replica_settings(settings))


def app(args: Mapping[str, Any]) -> Any:
    """Serve's application builder: ``serve run blipserve.ray_serve:app model=demo`` or a
    config file's ``import_path: blipserve.ray_serve:app`` with ``args``.

    ``args`` are blipserve's options by name (any part: ``model``, ``max_batch_size``,
    ``replicas``, ``num_gpus``, ...), as text or as YAML gives them; ``BLIPSERVE_*``
    variables are read as well, and ``args`` win.
    """
    return build(settings_from_mapping(args))


def settings_from_mapping(args: Mapping[str, Any]) -> Settings:
    """Settings from options by name; unknown names and bad values are refused by name."""
    fields = {
        f.name: (part, f, hint) for part in PARTS for f, hint in fields_with_types(PARTS[part])
    }
    overrides: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
    for name, value in args.items():
        key = str(name).replace("-", "_")
        if key not in fields:
            raise InvalidInput(f"unknown blipserve option {name!r} in the application's args")
        part, f, hint = fields[key]
        if isinstance(value, (list, tuple)):
            raw: str | list[str] = [str(v) for v in value]
        else:
            raw = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            overrides[part][key] = convert(f, hint, raw)
        except ValueError as exc:
            raise InvalidInput(f"option {name!r}: {exc}") from None
    return Settings.build(None, **overrides)


def serve_on_ray(settings: Settings, *, port_file: str | None = None) -> int:
    """``blipserve serve --ray``: deploy the replicas, keep Serve's proxy on ``--host`` /
    ``--port`` until SIGINT or SIGTERM, then drain and stop; the exit code.

    On a cluster where Serve already runs (other applications, their proxy), only the
    application ``blipserve`` is added and, at the end, deleted; Serve itself is stopped
    only when it was started here.
    """
    ray = _import("ray")
    serve = _import("ray.serve")
    server = settings.server
    port = server.port or _free_port(server.host)
    started_ray = not ray.is_initialized()
    if started_ray:
        if settings.ray.ray_address is None:  # a local cluster: its proxy inherits this
            os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        ray.init(address=settings.ray.ray_address, ignore_reinit_error=True)
    started_serve = not _serve_running(ray)
    if not started_serve and APP_NAME in serve.status().applications:
        raise InvalidInput(
            f"an application named {APP_NAME!r} already runs on this Ray cluster's Serve: "
            "stop it first (serve shutdown, or the process that deployed it)"
        )
    stopping = Stopping()
    previous = {sig: signal.signal(sig, stopping.handle) for sig in _STOP_SIGNALS}
    try:
        if started_serve:
            serve.start(http_options=proxy_http_options(server, port))
        try:
            serve.run(build(settings), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # the deployment failed: its replicas could not start
            log.error("could not start the replicas: %s", exc)
            return 1
        stopping.deployed = True
        if started_serve:
            if port_file:
                tmp = Path(port_file + ".tmp")
                tmp.write_text(f"{port}\n")
                tmp.replace(port_file)
            log.warning("blipserve on Ray Serve: http://%s:%d", server.host, port)
        else:
            log.warning("blipserve deployed behind the Serve proxy already on the cluster")
        while not stopping.requested:
            time.sleep(0.2)
        return 0
    except Stopping.Requested:  # SIGINT or SIGTERM while the replicas were loading
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Drain: deleting the application stops routing to its replicas and waits for the
        # requests they hold (up to graceful_shutdown_timeout_s) while the proxy relays
        # their answers; only then does the proxy go.
        serve.delete(APP_NAME)
        if started_serve:
            serve.shutdown()
        if started_ray:
            ray.shutdown()


class Stopping:
    """SIGINT and SIGTERM for ``serve_on_ray``: a flag once deployed (the main loop polls
    it; nothing that takes a lock runs in the handler); before that, an exception that
    interrupts ``serve.run``, which waits for the replicas to load (minutes for BLIP-2)."""

    class Requested(Exception):
        pass

    def __init__(self) -> None:
        self.requested = False
        self.deployed = False

    def handle(self, signum: int, frame: object) -> None:
        self.requested = True
        if not self.deployed:
            raise Stopping.Requested()


def _serve_running(ray: Any) -> bool:
    """Whether Serve's controller runs on the cluster this process joined."""
    try:
        ray.get_actor(_CONTROLLER, namespace="serve")
    except ValueError:
        return False
    return True


_CONTROLLER = "SERVE_CONTROLLER_ACTOR"  # ray.serve._private.constants.SERVE_CONTROLLER_NAME
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _free_port(host: str) -> int:
    """A port free now on ``host`` (Serve's proxy takes a fixed port, not 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _import(name: str) -> Any:
    try:  # imported as Any: Ray's own annotations are partial
        return importlib.import_module(name)
    except ImportError:
        raise InvalidInput(NEEDS_SERVE) from None
