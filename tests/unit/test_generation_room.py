"""A row whose text plus max_new_tokens overruns the model's positions is that row's 400.

Past its learned position embeddings ``generate`` raises an index error inside the model,
which used to fail the whole batch with a 500 (e.g. ``max_new_tokens: 100`` on the demo
model, which has 64 positions). The adapters now refuse such a row before batching, at
exactly the boundary where the model would fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from blipserve.config import ModelConfig
from blipserve.engine import Engine
from blipserve.errors import InvalidInput, RowError
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction, RowInput
from helpers import b64_png

PREFIX = "a picture of a dog sitting on the grass"
# (tiny model, row text, the largest max_new_tokens that fits its 128 positions)
BOUNDARIES = [
    ("blip-caption", None, 128),  # [DEC] + 128 new tokens (the last is never fed back)
    ("blip-caption", PREFIX, 119),  # the prefix is the prompt: 11 tokens less [SEP]
    ("blip-vqa", PREFIX, 128),  # the question goes to the encoder; the decoder starts at [BOS]
    ("blip2-opt", None, 124),  # 4 query tokens + OPT's BOS
    ("blip2-opt", PREFIX, 115),
]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: dict[str, Path]) -> dict[str, Engine]:
    kinds = ["blip-caption", "blip-vqa", "blip-itm", "blip2-opt", "blip2-t5"]
    return {k: Engine.load(ModelConfig(model=str(tiny_model_dir[k]))) for k in kinds}


def key(engine: Engine, text: str | None, **params: int) -> object:
    item = ModelInput(Image.new("RGB", (8, 8)), text, GenerationParams(**params))
    engine.adapter.check_row(item)
    return engine.adapter.batch_key(item)


@pytest.mark.parametrize(("kind", "text", "room"), BOUNDARIES)
def test_room_is_checked_at_the_exact_boundary(
    engines: dict[str, Engine], kind: str, text: str | None, room: int
) -> None:
    engine = engines[kind]
    key(engine, text, max_new_tokens=room)
    with pytest.raises(InvalidInput, match=f"room for at most {room} new tokens"):
        key(engine, text, max_new_tokens=room + 1)


@pytest.mark.parametrize(("kind", "text", "room"), BOUNDARIES)
def test_overrun_is_the_rows_error_and_runs_nothing(
    engines: dict[str, Engine], kind: str, text: str | None, room: int
) -> None:
    rows = [RowInput(0, b64_png(0), text), RowInput(1, b64_png(1), text)]
    params = GenerationParams(max_new_tokens=room + 1)
    outcomes = engines[kind].predict(rows, params)
    for position, outcome in enumerate(outcomes):
        assert isinstance(outcome, RowError)
        assert outcome.row == position
        assert f"max_new_tokens is {room + 1}" in outcome.message


def test_default_max_new_tokens_is_counted_too(engines: dict[str, Engine]) -> None:
    engine = engines["blip-caption"]
    default = engine.adapter.default_max_new_tokens
    text = " ".join(["dog"] * (128 - default + 1))  # + [CLS]/[SEP]: one position short
    with pytest.raises(InvalidInput, match="the model's default max_new_tokens is"):
        key(engine, text)


@pytest.mark.parametrize("kind", ["blip-caption", "blip-vqa", "blip-itm"])
def test_text_longer_than_the_positions(engines: dict[str, Engine], kind: str) -> None:
    [outcome] = engines[kind].predict([RowInput(0, b64_png(0), "word " * 200)])
    assert isinstance(outcome, RowError)
    assert "tokens long; this model accepts at most 128" in outcome.message


def test_prompt_leaving_no_room(engines: dict[str, Engine]) -> None:
    [outcome] = engines["blip2-opt"].predict([RowInput(0, b64_png(0), "word " * 200)])
    assert isinstance(outcome, RowError)
    assert "no room left to generate" in outcome.message


def test_t5_positions_are_relative(engines: dict[str, Engine]) -> None:
    key(engines["blip2-t5"], PREFIX, max_new_tokens=512)  # no limit to refuse at


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "text", "room"), BOUNDARIES)
def test_generating_right_up_to_the_boundary_works(
    engines: dict[str, Engine], kind: str, text: str | None, room: int
) -> None:
    params = GenerationParams(max_new_tokens=room, min_new_tokens=room, num_beams=1)
    [outcome] = engines[kind].predict([RowInput(0, b64_png(0), text)], params)
    assert isinstance(outcome, Prediction), outcome
