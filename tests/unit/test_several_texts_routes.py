"""Several texts per row and the repetition guard through the catalog's ``/score``, in
process (the app over a real engine on the tiny BLIP captioner): the answers, the
unchanged answer when one text is asked for, the 400s naming the parameter, the OpenAPI
document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from blipserve.config import EngineConfig, ModelConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.server.app import ServerState, create_app
from helpers import b64_png

ROWS = [[b64_png(0)], [b64_png(1)]]


def score_body(**params: Any) -> dict[str, Any]:
    return {"input_data": {"columns": ["image"], "data": ROWS}, "params": params}


@pytest.fixture(scope="module")
def client(tiny_model_dir: dict[str, Path]) -> Iterator[TestClient]:
    model = str(tiny_model_dir["blip-caption"])
    settings = Settings(
        model=ModelConfig(model=model), server=ServerConfig(max_wait_ms=0, warmup=False)
    )
    app = create_app(settings)
    state = app.state.blipserve
    assert isinstance(state, ServerState)
    state.load(Engine.load(ModelConfig(model=model), config=EngineConfig(max_batch_size=4)))
    yield TestClient(app)
    state.shutdown()


def test_several_texts_best_first_and_one_text_as_before(client: TestClient) -> None:
    one = client.post("/score", json=score_body(max_new_tokens=5, num_beams=3)).json()
    assert [set(a) for a in one] == [{"text"}, {"text"}]  # what existing clients know
    several = client.post(
        "/score", json=score_body(max_new_tokens=5, num_beams=3, num_return_sequences=3)
    )
    assert several.status_code == 200, several.text
    for single, answer in zip(one, several.json(), strict=True):
        assert set(answer) == {"text", "texts"}
        assert len(set(answer["texts"])) == 3
        assert answer["texts"][0] == answer["text"] == single["text"]
    sampled = score_body(max_new_tokens=5, do_sample=True, num_return_sequences=4)
    assert [len(a["texts"]) for a in client.post("/score", json=sampled).json()] == [4, 4]
    explicit_one = score_body(max_new_tokens=5, num_beams=3, num_return_sequences=1)
    assert client.post("/score", json=explicit_one).json() == one


def test_no_repeat_ngram_size_is_taken(client: TestClient) -> None:
    response = client.post("/score", json=score_body(max_new_tokens=5, no_repeat_ngram_size=2))
    assert response.status_code == 200, response.text
    assert [set(a) for a in response.json()] == [{"text"}, {"text"}]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"num_return_sequences": 17},
            "params.num_return_sequences: Input should be less than or equal to 16",
        ),
        ({"num_return_sequences": 0}, "params.num_return_sequences: Input should be greater"),
        (
            {"no_repeat_ngram_size": 11},
            "params.no_repeat_ngram_size: Input should be less than or equal to 10",
        ),
        ({"no_repeat_ngram_size": "2"}, "params.no_repeat_ngram_size must be a number"),
        (
            {"num_return_sequences": 4, "num_beams": 3},
            "params: num_return_sequences (4) must not exceed num_beams (3)",
        ),
        (  # the tiny model decodes greedily by default: one 400 for the request, no rows
            {"num_return_sequences": 2},
            "num_return_sequences (2) needs beam search (num_beams of at least 2)",
        ),
    ],
)
def test_bad_settings_are_a_400_naming_the_parameter(
    client: TestClient, params: dict[str, Any], message: str
) -> None:
    response = client.post("/score", json=score_body(**params))
    assert response.status_code == 400
    assert message in response.json()["message"]
    assert "row" not in response.json()["message"]


def test_openapi_documents_the_parameters_and_texts(client: TestClient) -> None:
    doc = client.get("/swagger.json").json()
    schemas = doc["components"]["schemas"]
    assert {"num_return_sequences", "no_repeat_ngram_size"} <= set(
        schemas["GenerationParams"]["properties"]
    )
    assert "texts" in schemas["ScoreAnswerSchema"]["properties"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    n = chat["application/json"]["schema"]["properties"]["n"]
    assert any(option.get("maximum") == 16 for option in n.get("anyOf", [n]))
