"""BLIP-2's image-text matching on a tiny random model (ViT, Q-Former with BERT's tokens).

Built from transformers' configuration classes and saved with ``save_pretrained``
(tests/tiny_models.py), loaded by ``build_model`` as any folder or hub id is; served as
BLIP's ITM model is: a match probability per row, through the engine, ``/score`` and
CapFilt's filter engine.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import tiny_models
from blipserve.batch.runner import BatchJob, BatchOptions
from blipserve.config import EngineConfig, ModelConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.errors import InvalidInput
from blipserve.models import build_model
from blipserve.models.base import HFAdapter
from blipserve.models.blip2_itm import Blip2MatchAdapter
from blipserve.params import GenerationParams
from blipserve.server.app import ServerState, create_app
from blipserve.types import ModelInput, Prediction, RowInput
from helpers import b64_png, jpeg_bytes, make_image, photos

PARAMS = GenerationParams()
TEXTS = ["a dog", "two cats laying on a pink blanket", "x", "a photo of a street at night"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("blip2-itm", tmp_path_factory.mktemp("blip2-itm") / "model")


@pytest.fixture(scope="module")
def adapter(folder: Path) -> Blip2MatchAdapter:
    """Loaded as ``blipserve serve --model FOLDER`` loads it (dtype auto)."""
    loaded = build_model(ModelConfig(model=str(folder)))
    assert isinstance(loaded, Blip2MatchAdapter)
    return loaded


def engine_over(adapter: HFAdapter, max_batch_size: int) -> Engine:
    return Engine(adapter, config=EngineConfig(max_batch_size=max_batch_size))


def photo_rows() -> list[RowInput]:
    """Photographs as a client sends them (base64 JPEG), one text each, each text twice."""
    images = [base64.b64encode(jpeg_bytes(p)).decode() for p in photos().values()]
    pairs = [(image, text) for image in images for text in TEXTS[:2]]
    return [RowInput(i, image, text) for i, (image, text) in enumerate(pairs)]


def test_scores_are_match_probabilities(adapter: Blip2MatchAdapter) -> None:
    assert (adapter.kind, adapter.text_role, adapter.text_required) == ("blip2-itm", "match", True)
    items = [ModelInput(make_image(i), text, PARAMS) for i, text in enumerate(TEXTS)]
    got = adapter.predict(items)
    scores = [p.score for p in got]
    assert all(s is not None and 0.0 < s < 1.0 for s in scores)
    assert [p.text for p in got] == [f"{s:.4f}" for s in scores]
    assert len(set(scores)) > 1  # (the text and image matter, even to random weights)


def test_scores_with_or_without_image_tokens(adapter: Blip2MatchAdapter) -> None:
    # blip2-itm-vit-g's config has an image_token_index (Blip2Processor's <image> tokens,
    # which the model drops before the text: the adapter puts them there); older copies
    # of it have none, and the model adds the queries' mask itself.
    config = adapter.model.config
    assert config.image_token_index == adapter.tokenizer.convert_tokens_to_ids("<image>")
    items = [ModelInput(make_image(i), text, PARAMS) for i, text in enumerate(TEXTS)]
    with_tokens = adapter.predict(items)
    config.image_token_index = None
    try:
        assert adapter.predict(items) == with_tokens
    finally:
        config.image_token_index = adapter.tokenizer.convert_tokens_to_ids("<image>")


def test_rows_refused_one_by_one(adapter: Blip2MatchAdapter) -> None:
    image = make_image(0)
    with pytest.raises(InvalidInput, match="at most 64"):
        adapter.check_row(ModelInput(image, "word " * 80, PARAMS))
    with pytest.raises(InvalidInput, match="num_return_sequences"):
        adapter.check_row(ModelInput(image, "a dog", GenerationParams(num_return_sequences=2)))


def test_batched_equals_one_by_one_on_photographs(adapter: Blip2MatchAdapter) -> None:
    rows = photo_rows()
    with engine_over(adapter, 4) as batched, engine_over(adapter, 1) as single:
        got = batched.predict(rows, PARAMS)
        assert all(isinstance(p, Prediction) for p in got)
        assert got == single.predict(rows, PARAMS)
        assert got == [single.predict([row], PARAMS)[0] for row in rows]
        # a row scores the same whichever rows share its batch
        assert batched.predict(rows[::-1], PARAMS) == got[::-1]
        assert batched.predict(rows[1::2], PARAMS) == got[1::2]


def test_score_route(folder: Path) -> None:
    from starlette.testclient import TestClient

    model = ModelConfig(model=str(folder), dtype="float32", backend="torch")
    app = create_app(Settings(model=model, server=ServerConfig(warmup=False)))
    state = app.state.blipserve
    assert isinstance(state, ServerState)
    state.load()
    try:
        client = TestClient(app)
        image = b64_png(5)
        body = {"input_data": {"columns": ["image", "text"], "data": [[image, "a cat"]]}}
        [scored] = client.post("/score", json=body).json()
        with Engine.load(model) as engine:
            [want] = engine.predict([RowInput(0, image, "a cat")], PARAMS)
        assert isinstance(want, Prediction)
        assert scored == {"text": want.text, "score": want.score}
        missing = {"input_data": {"columns": ["image"], "data": [[image]]}}
        assert client.post("/score", json=missing).status_code == 400
    finally:
        state.shutdown()


@pytest.fixture(scope="module")
def filter_engine(adapter: Blip2MatchAdapter) -> Iterator[Engine]:
    with engine_over(adapter, 4) as engine:
        yield engine


def test_capfilt_filter_engine(engine: Engine, filter_engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "web"
    folder.mkdir()
    for i in range(3):
        make_image(i).save(folder / f"{i}.png")
    pd.DataFrame(
        {"image": [f"{i}.png" for i in range(3)], "text": ["a dog", None, "a cat"]}
    ).to_csv(folder / "web.csv", index=False)
    out = tmp_path / "out.jsonl"
    options = BatchOptions(
        input=folder / "web.csv",
        output=out,
        params=GenerationParams(max_new_tokens=4),
        min_match=0.0,
        progress=False,
    )
    BatchJob(engine, options, filter_engine).run()
    rows: list[dict[str, Any]] = [json.loads(line) for line in out.read_text().splitlines()]
    assert not any(r["error"] for r in rows)
    image = base64.b64encode((folder / "0.png").read_bytes()).decode()
    for row in rows:
        assert 0.0 <= row["score"] <= 1.0
        assert row["keep"] is True
    [want] = filter_engine.predict([RowInput(0, image, rows[0]["text"])], PARAMS)
    assert isinstance(want, Prediction)
    assert rows[0]["score"] == want.score
    assert rows[0]["text_in"] == "a dog"
    assert rows[0]["text_in_keep"] is True
    assert "text_in" not in rows[1]
