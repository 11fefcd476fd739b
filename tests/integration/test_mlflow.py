"""blipserve models as MLflow pyfunc models, end to end and offline: the demo model exported
with ``blipserve export mlflow``, loaded with ``mlflow.pyfunc.load_model``, served by
MLflow's own scoring server (``mlflow models serve --env-manager local``), and registered
in a local tracking store and served as ``models:/NAME/1``.  Every answer must be what
blipserve's own Engine says for the same images (the demo's captions of examples/*.png are
right and deterministic), bad rows MLflow's 400 naming the row."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from blipserve.config import EngineConfig, FetchConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput
from helpers import jpeg_bytes, photos
from stores import free_port

pytestmark = pytest.mark.filterwarnings(
    # mlflow 3.17's sqlite tracking store asks SQLAlchemy 2.1 for a deprecated loader
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning",
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# The exported model's settings, and the reference engine's: float32 on the CPU, torch's
# vision encoder (fast to load, the same answers in both), batches of 4 (rows > 4 batch).
FLAGS = ("--device", "cpu", "--dtype", "float32", "--backend", "torch", "--max-batch-size", "4")
SETTINGS = ModelConfig(model="demo", device="cpu", dtype="float32", backend="torch")


@dataclass
class Images:
    """Rows as clients send them: base64 as ``base64.encodebytes`` writes it."""

    scenes: list[str]  # examples/scene-0*.png
    captions: list[str]  # their captions (examples/metadata.jsonl)
    photos: list[str]  # photographs as JPEG (skimage, sklearn): real sizes


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()


@pytest.fixture(scope="module")
def images() -> Images:
    meta = [json.loads(line) for line in (EXAMPLES / "metadata.jsonl").read_text().splitlines()]
    return Images(
        scenes=[b64((EXAMPLES / m["file_name"]).read_bytes()) for m in meta],
        captions=[m["text"] for m in meta],
        photos=[b64(jpeg_bytes(img)) for img in photos().values()],
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """MLflow kept local: a sqlite tracking store in the test's folder, no telemetry; the
    venv's scripts (MLflow's server starts ``uvicorn``) first on PATH.  Set here too."""
    store = tmp_path_factory.mktemp("mlflow-store")
    values = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def exported(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, exported as a user exports it."""
    out = tmp_path_factory.mktemp("export") / "blip-demo"
    command = [sys.executable, "-m", "blipserve.cli", "export", "mlflow", "--model", "demo"]
    done = subprocess.run(
        [*command, *FLAGS, "--allow-url-host", "127.0.0.1", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"MLflow model saved to {out}" in done.stderr
    return out


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """blipserve's own engine on the same model and settings: the reference."""
    fetch = FetchConfig(allow_url_hosts=("127.0.0.1",))
    with Engine.load(SETTINGS, config=EngineConfig(max_batch_size=4), fetch=fetch) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def pyfunc(exported: Path) -> Any:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(exported))


def engine_texts(
    engine: Engine, images: list[str], texts: list[str | None] | None = None, **params: Any
) -> list[str]:
    rows = [
        RowInput(i, image, (texts or [None] * len(images))[i]) for i, image in enumerate(images)
    ]
    outcomes = engine.predict(rows, GenerationParams(**params))
    assert all(isinstance(o, Prediction) for o in outcomes), outcomes
    return [o.text for o in outcomes if isinstance(o, Prediction)]


# -- mlflow.pyfunc.load_model ---------------------------------------------------------------


def test_the_model_folder_holds_the_model_its_settings_and_requirements(exported: Path) -> None:
    assert (exported / "artifacts" / "demo" / "model.safetensors").is_file()
    mlmodel = (exported / "MLmodel").read_text()
    assert "dtype: float32" in mlmodel
    assert "max_batch_size: 4" in mlmodel
    requirements = (exported / "requirements.txt").read_text().split()
    assert "blipserve==0.1.0" in requirements
    assert any(r.startswith("mlflow==") for r in requirements)
    assert not (exported / "python_model.pkl").exists()  # models from code: nothing pickled


def test_loaded_model_says_what_the_engine_says(
    pyfunc: Any, engine: Engine, images: Images
) -> None:
    frame = pd.DataFrame({"image": images.scenes + images.photos})
    answer = pyfunc.predict(frame)
    assert list(answer.columns) == ["text"]
    assert answer["text"].tolist() == engine_texts(engine, images.scenes + images.photos)
    assert answer["text"].tolist()[: len(images.scenes)] == images.captions  # and they are right
    # bytes (a Python caller's) say the same
    raw = [base64.b64decode(s) for s in images.scenes[:3]]
    assert pyfunc.predict(pd.DataFrame({"image": raw}))["text"].tolist() == images.captions[:3]


def test_text_rows_and_params_take_effect(pyfunc: Any, engine: Engine, images: Images) -> None:
    texts: list[str | None] = ["a small", None, "a large", None, "a", None]
    frame = pd.DataFrame({"image": images.scenes[:6], "text": texts})
    assert pyfunc.predict(frame)["text"].tolist() == engine_texts(engine, images.scenes[:6], texts)
    short = pyfunc.predict(frame[["image"]], params={"max_new_tokens": 1})["text"].tolist()
    assert short == engine_texts(engine, images.scenes[:6], max_new_tokens=1)
    assert all(
        len(s.split()) < len(c.split()) for s, c in zip(short, images.captions[:6], strict=True)
    )
    beams = pyfunc.predict(frame[["image"]], params={"num_beams": 3, "num_return_sequences": 3})
    assert list(beams.columns) == ["text", "texts"]
    assert beams["text"].tolist() == engine_texts(
        engine, images.scenes[:6], num_beams=3, num_return_sequences=3
    )
    assert all(
        len(set(t)) == 3 and t[0] == b for t, b in zip(beams["texts"], beams["text"], strict=True)
    )


def test_a_bad_row_fails_the_call_with_mlflows_error_naming_it(pyfunc: Any, images: Images) -> None:
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame({"image": [images.scenes[0], "not base64!"]}, index=["a", "b"])
    with pytest.raises(MlflowException) as caught:
        pyfunc.predict(frame)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message.startswith("row 1 (index 'b'): image is not valid base64")
    with pytest.raises(MlflowException, match=r"params\.num_beams: .* less than or equal to 16"):
        pyfunc.predict(frame.iloc[:1], params={"num_beams": 17})


def test_model_config_overrides_the_saved_settings(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc

    from blipserve.errors import InvalidInput

    model = mlflow.pyfunc.load_model(str(exported), model_config={"max_batch_size": 2})
    engine = model.unwrap_python_model().engine
    assert engine.max_batch_size == 2
    assert engine.adapter.device.type == "cpu"  # (the rest as saved)
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"max_batch_size": 3}')
    assert mlflow.pyfunc.load_model(str(exported)).unwrap_python_model().engine.max_batch_size == 3
    with pytest.raises(InvalidInput, match=r"^model_config 'dtype': expected one of auto, "):
        mlflow.pyfunc.load_model(str(exported), model_config={"dtype": "float64"})


# -- MLflow's scoring server ----------------------------------------------------------------


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    started_in_s: float

    def invoke(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}/invocations", json=body, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:  # its process group: mlflow and the uvicorn it starts
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_mlflow_server(
    model_uri: str, env: dict[str, str], workdir: Path, timeout: float = 240
) -> MlflowServer:
    """``mlflow models serve`` on a free loopback port, polled on /ping until it answers."""
    port = free_port()
    log = workdir / "mlflow-serve.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri),
                *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # (stopped as a group: mlflow runs uvicorn in a child)
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, log, 0.0)
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/ping", timeout=2).status_code == 200:
                server.started_in_s = time.monotonic() - started
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"mlflow models serve not ready in {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(
    exported: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    started = start_mlflow_server(str(exported), env, tmp_path_factory.mktemp("serve"))
    print(f"mlflow models serve answered /ping {started.started_in_s:.1f} s after its start")
    yield started
    started.stop()


def split(images: list[str], texts: list[str | None] | None = None, **extra: Any) -> dict[str, Any]:
    columns = ["image"] if texts is None else ["image", "text"]
    data = [[image] if texts is None else [image, texts[i]] for i, image in enumerate(images)]
    body: dict[str, Any] = {"dataframe_split": {"columns": columns, "data": data}}
    body["dataframe_split"].update(extra)
    return body


def texts_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["text"] for p in response.json()["predictions"]]


def test_server_answers_dataframe_split_and_records(
    server: MlflowServer, engine: Engine, images: Images
) -> None:
    rows = images.scenes + images.photos
    texts: list[str | None] = [None, "a small", None, None, "a large", *[None] * 9]
    index = [f"r{i}" for i in range(len(rows))]
    answer = server.invoke(split(rows, texts, index=index))
    assert texts_of(answer) == engine_texts(engine, rows, texts)
    assert texts_of(answer)[0] == images.captions[0]
    records = [{"image": image} for image in images.scenes]
    assert texts_of(server.invoke({"dataframe_records": records})) == images.captions


def test_server_params_take_effect(server: MlflowServer, engine: Engine, images: Images) -> None:
    short = texts_of(server.invoke({**split(images.scenes), "params": {"max_new_tokens": 1}}))
    assert short == engine_texts(engine, images.scenes, max_new_tokens=1)
    assert all(len(s) < len(c) for s, c in zip(short, images.captions, strict=True))
    body = {**split(images.scenes[:3]), "params": {"num_beams": 4, "num_return_sequences": 2}}
    answer = server.invoke(body)
    assert texts_of(answer) == engine_texts(
        engine, images.scenes[:3], num_beams=4, num_return_sequences=2
    )
    # greedy decoding has one answer: two different texts a row are the beams'
    assert all(len(set(p["texts"])) == 2 for p in answer.json()["predictions"])


def test_server_bad_row_is_mlflows_400_naming_it_and_it_keeps_serving(
    server: MlflowServer, images: Images
) -> None:
    body = split([images.scenes[0], "data:image/png;base64,@@@@", images.scenes[1]])
    body["dataframe_split"]["index"] = ["a", "b", "c"]
    answer = server.invoke(body)
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "row 1 (index 'b'): image is not valid base64" in error["message"]
    bad_params = server.invoke({**split(images.scenes[:1]), "params": {"num_beams": 0}})
    assert bad_params.status_code == 400
    assert "params.num_beams" in bad_params.json()["message"]
    assert texts_of(server.invoke(split(images.scenes[:2]))) == images.captions[:2]


def test_server_answers_concurrent_requests_each_in_order(
    server: MlflowServer, images: Images
) -> None:
    # MLflow runs each request's predict on a thread of its own: the engine is shared
    from concurrent.futures import ThreadPoolExecutor

    orders = [list(range(i, i + 5)) for i in range(4)]  # overlapping rows, shifted

    def ask(order: list[int]) -> list[str]:
        return texts_of(server.invoke(split([images.scenes[i] for i in order])))

    with ThreadPoolExecutor(len(orders)) as pool:
        answers = list(pool.map(ask, orders))
    assert answers == [[images.captions[i] for i in order] for order in orders]


def test_server_fetches_url_rows_the_model_was_exported_to_allow(
    server: MlflowServer, images: Images
) -> None:
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(EXAMPLES), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Quiet) as files:
        Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/scene-02.png"
        try:
            assert texts_of(server.invoke(split([url, images.scenes[0]]))) == [
                images.captions[1],
                images.captions[0],
            ]
        finally:
            files.shutdown()


# -- a registered model -----------------------------------------------------------------------


def test_a_registered_model_is_served_by_its_name(
    env: dict[str, str], images: Images, tmp_path: Path
) -> None:
    import mlflow

    from blipserve.config import Settings
    from blipserve.mlflow import log_model

    # (artifacts in the test's folder: a sqlite store's default is ./mlruns, in the cwd)
    experiment = mlflow.create_experiment("blipserve", str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        info = log_model(
            "model",
            "demo",
            settings=Settings(model=SETTINGS),
            registered_model_name="blip-demo",
        )
    assert info.registered_model_version == 1
    assert next((tmp_path / "artifacts").rglob("MLmodel"))
    served = start_mlflow_server("models:/blip-demo/1", env, tmp_path)
    try:
        assert texts_of(served.invoke(split(images.scenes[:3]))) == images.captions[:3]
    finally:
        served.stop()


# -- where the model's files and blipserve's code come from ----------------------------------


def hub_cache(model: Path, cache: Path, repo: str) -> None:
    """``model``'s files in a Hugging Face cache as the Hub client lays it out: content in
    blobs/, the snapshot's files symbolic links to them, refs/main naming the snapshot."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        link = snapshot / path.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_a_hub_id_is_exported_from_the_local_cache(
    env: dict[str, str], tmp_path: Path, images: Images
) -> None:
    import mlflow.models
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    import tiny_models

    source = tiny_models.build("blip-itm", tmp_path / "tiny-itm")
    hub_cache(source, tmp_path / "hub", "Salesforce/blip-itm-tiny")
    out = tmp_path / "itm"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "blipserve.cli", "export", "mlflow"),
            *("--model", "Salesforce/blip-itm-tiny", *FLAGS, str(out)),
        ],
        env={**env, "HF_HUB_CACHE": str(tmp_path / "hub")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (weights,) = out.glob("artifacts/*/model.safetensors")
    assert not weights.is_symlink()  # the file itself, not a link into this machine's cache
    assert weights.read_bytes() == (source / "model.safetensors").read_bytes()
    signature = mlflow.models.Model.load(str(out)).signature
    assert signature.inputs.required_input_names() == ["image", "text"]  # (text required)
    assert signature.outputs.input_names() == ["text", "score", "texts"]

    pairs = ["two cats", "a red square", "a dog on a beach"]
    frame = pd.DataFrame({"image": images.photos[:3], "text": pairs})
    answer = mlflow.pyfunc.load_model(str(out)).predict(frame)
    assert list(answer.columns) == ["text", "score"]
    config = dataclasses.replace(SETTINGS, model=str(source))
    with Engine.load(config) as reference:
        rows = [RowInput(i, img, pairs[i]) for i, img in enumerate(images.photos[:3])]
        expected = reference.predict(rows)
    assert answer["text"].tolist() == [o.text for o in expected if isinstance(o, Prediction)]
    assert answer["score"].tolist() == [o.score for o in expected if isinstance(o, Prediction)]
    missing = pd.DataFrame({"image": images.photos[:1], "text": [None]})
    with pytest.raises(MlflowException, match=r"row 0: this model scores image-text pairs"):
        mlflow.pyfunc.load_model(str(out)).predict(missing)


def test_bundled_code_runs_without_blipserve_installed(
    env: dict[str, str], tmp_path: Path, images: Images
) -> None:
    from blipserve.config import Settings
    from blipserve.mlflow import save_model

    out = tmp_path / "bundled"
    save_model(out, "demo", settings=Settings(model=SETTINGS), bundle_code=True)
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert not any(r.startswith("blipserve") for r in requirements)
    assert any(r.startswith("transformers") for r in requirements)
    assert (out / "code" / "blipserve" / "engine" / "core.py").is_file()
    assert not (out / "code" / "blipserve" / "demo" / "models").exists()  # (an artifact)
    # A Python that has the dependencies but not blipserve: -S skips site-packages' .pth
    # files, among them the editable install's path to src/.
    script = f"""
import sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
try:
    import blipserve
except ImportError:
    pass
else:
    raise SystemExit("blipserve is importable before the model is loaded")
import mlflow.pyfunc, pandas
model = mlflow.pyfunc.load_model({str(out)!r})
print(sys.modules["blipserve"].__file__)
print(model.predict(pandas.DataFrame({{"image": {images.scenes[:2]!r}}}))["text"].tolist())
"""
    done = subprocess.run(
        [sys.executable, "-S", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    where, texts = done.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(out / "code" / "blipserve"))
    assert texts == repr(images.captions[:2])
