"""Several captions per image on the built-in demo models, loaded by name: the best beams
are distinct, the first is the single beam-search answer, and each counts its own tokens."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest

from blipserve.config import EngineConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.finetune.scenes import HELDOUT_SEED, Scene, generate
from blipserve.models.base import HFAdapter
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput

START = 6_000  # held-out scenes, away from those other checks use
SAMPLE = 24


def b64(scene: Scene) -> str:
    buffer = io.BytesIO()
    scene.image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def rows() -> list[RowInput]:
    scenes = generate(HELDOUT_SEED, SAMPLE, start=START)
    return [RowInput(i, b64(scene)) for i, scene in enumerate(scenes)]


@pytest.fixture(scope="module", params=["demo", "demo-vqa"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    with Engine.load(
        ModelConfig(model=request.param, device="cpu"), config=EngineConfig(max_batch_size=8)
    ) as loaded:
        yield loaded


def predictions(engine: Engine, rows: list[RowInput], **params: int) -> list[Prediction]:
    out = engine.predict(rows, GenerationParams(**params))
    assert all(isinstance(p, Prediction) for p in out), out
    return [p for p in out if isinstance(p, Prediction)]


def test_best_beams_are_distinct_and_the_first_is_the_beam_answer(
    engine: Engine, rows: list[RowInput]
) -> None:
    single = predictions(engine, rows, num_beams=4)
    several = predictions(engine, rows, num_beams=4, num_return_sequences=3)
    for one, many in zip(single, several, strict=True):
        assert one.texts is None
        assert many.texts is not None
        assert len(set(many.texts)) == 3, many.texts
        assert many.texts[0] == many.text == one.text


def test_each_text_counts_its_own_tokens(engine: Engine, rows: list[RowInput]) -> None:
    # Beam search fills finished beams with the end token; only the text and its one end
    # token count (what the OpenAI route reports as usage; every count was the longest
    # beam's before).
    adapter = engine.adapter
    assert isinstance(adapter, HFAdapter)
    several = predictions(engine, rows[:8], num_beams=4, num_return_sequences=4)
    limit = adapter.default_max_new_tokens
    for prediction in several:
        assert prediction.texts is not None
        assert prediction.texts_tokens is not None
        for text, tokens in zip(prediction.texts, prediction.texts_tokens, strict=True):
            # + the end token, unless the text ran to the limit
            assert tokens == min(_text_tokens(adapter, text) + 1, limit), text


def _text_tokens(adapter: HFAdapter, text: str) -> int:
    return len(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])
