"""blipserve.mlflow without a model: the DataFrame rows it reads, the model_config it keeps
and checks, the signature it declares, and its refusals before anything is written."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from blipserve.config import EngineConfig, FetchConfig, ModelConfig, Settings
from blipserve.errors import (
    InferenceError,
    InvalidInput,
    InvalidRequest,
    ModelLoadError,
    RowError,
)
from blipserve.mlflow.export import generation_param_types, model_folder, save_model, signature
from blipserve.mlflow.tables import (
    frame_columns,
    frame_records,
    params_from_request,
    rows_from_frame,
    settings_from_config,
    settings_to_config,
)
from blipserve.params import GenerationParams
from blipserve.types import Prediction


def test_rows_keep_order_cells_and_index_labels() -> None:
    frame = pd.DataFrame(
        {"image": ["  aGVsbG8=\n", b"\x89PNG", "https://x.test/a.jpg"], "text": ["q ", None, " "]},
        index=["a", "b", "c"],
    )
    rows = rows_from_frame(frame)
    assert [(r.position, r.image, r.text, r.index) for r in rows] == [
        (0, "aGVsbG8=", "q", "a"),
        (1, b"\x89PNG", None, "b"),
        (2, "https://x.test/a.jpg", None, "c"),  # (blank text: no text, as /score)
    ]


def test_a_default_index_names_rows_by_position_and_nan_text_is_none() -> None:
    frame = pd.DataFrame({"image": ["aGk=", "aGk="], "text": [float("nan"), "x"]})
    rows = rows_from_frame(frame)
    assert [r.index for r in rows] == [None, None]
    assert [r.text for r in rows] == [None, "x"]
    assert [r.image for r in rows_from_frame(pd.DataFrame({"image": ["aGk="]}))] == ["aGk="]


@pytest.mark.parametrize(
    ("image", "text", "message"),
    [
        (
            "",
            None,
            "row 1 (index 11): 'image' must be base64 text, an http(s) URL or image "
            "bytes, got an empty string",
        ),
        (
            None,
            None,
            "row 1 (index 11): 'image' must be base64 text, an http(s) URL or image "
            "bytes, got a missing value",
        ),
        (42, None, "got a number"),
        (b"", None, "row 1 (index 11): 'image' is empty"),
        ("aGk=", 3, "row 1 (index 11): 'text' must be a string or null, got a number"),
        ("aGk=", "x" * 2001, "'text' has 2001 characters; at most 2000"),
    ],
)
def test_a_bad_cell_names_its_row(image: object, text: object, message: str) -> None:
    frame = pd.DataFrame(
        {"image": ["aGk=", image], "text": [None, text]}, index=[10, 11], dtype=object
    )
    with pytest.raises(RowError, match=r"^row 1") as caught:
        rows_from_frame(frame)
    assert message in caught.value.message
    assert caught.value.status == 400


def test_no_image_column_is_refused() -> None:
    with pytest.raises(InvalidInput, match="needs an 'image' column"):
        rows_from_frame(pd.DataFrame({"picture": ["aGk="]}))


def test_answer_columns_follow_the_model_and_the_request() -> None:
    assert frame_columns("prefix", GenerationParams()) == ["text"]
    assert frame_columns("match", GenerationParams()) == ["text", "score"]
    several = GenerationParams(num_return_sequences=2, num_beams=2)
    assert frame_columns("prompt", several) == ["text", "texts"]
    predictions = [Prediction("a", texts=("a", "b")), Prediction("c", texts=("c", "d"))]
    assert frame_records(predictions, ["text", "texts"]) == {
        "text": ["a", "c"],
        "texts": [["a", "b"], ["c", "d"]],
    }
    assert frame_records([Prediction("0.9", score=0.9)], ["text", "score"]) == {
        "text": ["0.9"],
        "score": [0.9],
    }


def test_request_params_unset_ones_are_the_models_defaults() -> None:
    # MLflow fills every parameter of the signature, None where the request has none
    filled = {name: None for name in GenerationParams.model_fields} | {"num_beams": 3}
    assert params_from_request(filled) == GenerationParams(num_beams=3)
    assert params_from_request(None) == GenerationParams()
    with pytest.raises(InvalidRequest, match=r"^params\.num_beams: .*less than or equal to 16"):
        params_from_request({"num_beams": 17})
    with pytest.raises(InvalidRequest, match=r"min_new_tokens .5. must not exceed max_new_tokens"):
        params_from_request({"min_new_tokens": 5, "max_new_tokens": 2})


def test_settings_round_trip_through_model_config() -> None:
    settings = Settings(
        model=ModelConfig(model="demo", dtype="float32", backend="torch", device="cpu"),
        engine=EngineConfig(max_batch_size=4, decode_workers=2),
        fetch=FetchConfig(allow_url_hosts=("127.0.0.1", "images.test"), max_redirects=1),
    )
    config = settings_to_config(settings, "demo")
    assert config["source"] == "demo"
    assert "model" not in config
    assert "revision" not in config
    json.dumps(config)  # MLflow keeps it as JSON / YAML
    assert config["allow_url_hosts"] == ["127.0.0.1", "images.test"]
    loaded = settings_from_config(config, "/models/x")
    assert loaded.model == dataclasses.replace(settings.model, model="/models/x")
    assert (loaded.engine, loaded.images, loaded.fetch) == (
        settings.engine,
        settings.images,
        settings.fetch,
    )


def test_model_config_values_are_checked_as_their_flags_are() -> None:
    base = settings_to_config(Settings(), "demo")
    with pytest.raises(InvalidInput, match=r"model_config 'dtype': expected one of auto, "):
        settings_from_config({**base, "dtype": "float64"}, "/m")
    with pytest.raises(InvalidInput, match=r"model_config 'max_batch_size': expected an integer"):
        settings_from_config({**base, "max_batch_size": "many"}, "/m")
    with pytest.raises(
        InvalidInput, match=r"model_config 'max_batch_size': expected int, got True"
    ):
        settings_from_config({**base, "max_batch_size": True}, "/m")
    with pytest.raises(InvalidInput, match=r"unknown setting.*'batch_size'"):
        settings_from_config({**base, "batch_size": 4}, "/m")
    with pytest.raises(InvalidInput, match=r"invalid option: max_batch_size, .* must be >= 0"):
        settings_from_config({**base, "max_batch_size": -1}, "/m")
    # an override that leaves the rest as saved (MLflow replaces the keys it is given)
    assert settings_from_config({**base, "max_batch_size": 2}, "/m").engine.max_batch_size == 2


def test_signature_columns_and_parameters() -> None:
    captioner = signature("prefix", text_required=False).to_dict()
    assert json.loads(captioner["inputs"]) == [
        {"type": "string", "name": "image", "required": True},
        {"type": "string", "name": "text", "required": False},
    ]
    question = json.loads(signature("question", text_required=True).to_dict()["inputs"])
    assert question[1] == {"type": "string", "name": "text", "required": True}
    outputs = json.loads(signature("match", text_required=True).to_dict()["outputs"])
    assert [o["name"] for o in outputs] == ["text", "score", "texts"]
    params = {p["name"]: p for p in json.loads(captioner["params"])}
    assert list(params) == list(GenerationParams.model_fields)
    assert {p["default"] for p in params.values()} == {None}
    assert params["num_beams"]["type"] == "long"
    assert params["temperature"]["type"] == "double"
    assert params["do_sample"]["type"] == "boolean"
    assert set(generation_param_types().values()) == {"long", "double", "boolean"}


def test_a_model_blipserve_cannot_serve_is_refused_before_saving(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match=r"architecture .*BertModel.* does not serve"):
        save_model(tmp_path / "out", str(folder))
    assert not (tmp_path / "out").exists()


def test_a_requirement_and_bundled_code_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="exclude each other"):
        save_model(
            tmp_path / "out", "demo", requirement="blipserve @ file:///w.whl", bundle_code=True
        )
    assert not (tmp_path / "out").exists()


def test_a_hub_id_must_be_in_the_local_cache() -> None:
    # (tests run with HF_HUB_OFFLINE=1: nothing is downloaded, here or anywhere)
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache.*hf download"):
        model_folder("Salesforce/blip-not-cached", None)


def test_without_the_extra_saving_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # (import mlflow now fails)
    with pytest.raises(ImportError, match=r"pip install 'blipserve\[mlflow\]'"):
        save_model(tmp_path / "out", "demo")


def test_nan_is_missing_but_zero_is_a_value() -> None:
    frame = pd.DataFrame({"image": ["aGk="], "text": [0.0]}, dtype=object)
    with pytest.raises(RowError, match="got a number"):
        rows_from_frame(frame)


class _FailingEngine:
    """What BlipserveModel.predict needs of an engine, failing as told."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.adapter = type("Adapter", (), {"text_role": "prefix"})()

    def score(self, request: object) -> list[Prediction]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RowError(2, "image is not valid base64", "c"), "INVALID_PARAMETER_VALUE"),
        (InvalidRequest("params: bad"), "INVALID_PARAMETER_VALUE"),
        (InferenceError("the model failed on this request's batch"), "INTERNAL_ERROR"),
    ],
)
def test_predict_raises_mlflows_error_with_blipserves_message(error: Exception, code: str) -> None:
    from mlflow.exceptions import MlflowException

    from blipserve.mlflow.pyfunc import BlipserveModel

    model = BlipserveModel()
    model.engine = _FailingEngine(error)  # type: ignore[assignment]
    with pytest.raises(MlflowException) as caught:
        model.predict(None, pd.DataFrame({"image": ["aGk="]}))
    assert caught.value.error_code == code
    assert caught.value.message == str(error)
    status = caught.value.get_http_status_code()  # type: ignore[no-untyped-call]
    assert status == (500 if code == "INTERNAL_ERROR" else 400)
