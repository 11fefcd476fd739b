"""CapFilt with several captions an image (BLIP's K-sample recipe): every caption scored by
the matching model, the best one kept as ``text``, the others that reach ``--min-match``
in ``texts`` with their ``text_scores``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blipserve.batch.runner import BatchJob, BatchOptions
from blipserve.config import EngineConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput
from helpers import photos

BEAMS = GenerationParams(max_new_tokens=12, num_beams=4, num_return_sequences=4)
# The recipe's own settings: nucleus sampling, top-p 0.9
NUCLEUS = GenerationParams(max_new_tokens=12, do_sample=True, top_p=0.9, num_return_sequences=4)


@pytest.fixture(scope="module")
def engines(tiny_model_dir: dict[str, Path]) -> Iterator[tuple[Engine, Engine]]:
    config = EngineConfig(max_batch_size=4, model_workers=1)
    with (
        Engine.load(ModelConfig(model="demo"), config=config) as captioner,
        Engine.load(ModelConfig(model=str(tiny_model_dir["blip-itm"])), config=config) as itm,
    ):
        yield captioner, itm


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name, image in photos().items():
        image.save(folder / f"{name}.jpg", quality=90)
    return folder


def run(
    engines: tuple[Engine, Engine], images: Path, out: Path, params: GenerationParams, **kw: Any
) -> list[dict[str, Any]]:
    options = BatchOptions(input=images, output=out, params=params, progress=False, **kw)
    BatchJob(engines[0], options, engines[1]).run()
    return [json.loads(line) for line in out.read_text().splitlines()]


def match(itm: Engine, images: Path, row: dict[str, Any], text: str) -> float:
    [out] = itm.predict([RowInput(0, str(images / row["id"]), text)], allow_paths=True)
    assert isinstance(out, Prediction)
    assert out.score is not None
    return out.score


def test_each_caption_scored_and_the_best_kept(
    engines: tuple[Engine, Engine], images: Path, tmp_path: Path
) -> None:
    everything = run(engines, images, tmp_path / "all.jsonl", BEAMS, min_match=0.0)
    captions = {}
    for row in everything:
        assert not row["error"], row
        assert len(row["texts"]) == 4  # min_match 0: every caption kept
        assert row["text_scores"] == sorted(row["text_scores"], reverse=True)
        assert (row["text"], row["score"]) == (row["texts"][0], row["text_scores"][0])
        assert row["keep"] is True
        # the scores are the matching model's own for (image, caption)
        for text, score in zip(row["texts"], row["text_scores"], strict=True):
            assert match(engines[1], images, row, text) == pytest.approx(score, abs=2e-3)
        captions[row["id"]] = row

    # A threshold between the scores: only the captions that reach it stay in texts.
    scores = sorted(s for row in everything for s in row["text_scores"])
    threshold = scores[len(scores) // 2]
    filtered = run(engines, images, tmp_path / "half.jsonl", BEAMS, min_match=threshold)
    for row in filtered:
        before = captions[row["id"]]
        kept = [
            t for t, s in zip(before["texts"], before["text_scores"], strict=True) if s >= threshold
        ]
        assert row["texts"] == kept
        assert all(s >= threshold for s in row["text_scores"])
        assert row["text"] == before["text"]  # the best caption, kept or not
        assert row["keep"] is (before["score"] >= threshold)
    assert 0 < sum(len(row["texts"]) for row in filtered) < sum(len(r["texts"]) for r in everything)


def test_nucleus_samples_are_filtered_alike(
    engines: tuple[Engine, Engine], images: Path, tmp_path: Path
) -> None:
    rows = run(engines, images, tmp_path / "k.jsonl", NUCLEUS, min_match=0.5)
    assert len(rows) == len(photos())
    for row in rows:
        assert row["text"]
        assert all(s >= 0.5 for s in row["text_scores"])
        assert row["text_scores"] == sorted(row["text_scores"], reverse=True)
        assert len(row["texts"]) == len(row["text_scores"]) <= 4
        assert row["keep"] is (row["score"] >= 0.5)
        if row["texts"]:
            assert row["texts"][0] == row["text"]
