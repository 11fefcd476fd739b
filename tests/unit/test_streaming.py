"""Texts streamed as they are decoded (:mod:`blipserve.models.streaming`), on tiny models:
the pieces of each row of a batch add up to its answer, and arrive over several steps, for
BLIP-2 (OPT, T5) and BLIP (a caption, which includes its prefix, and an answer)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

from blipserve.config import ModelConfig
from blipserve.engine import Engine
from blipserve.models.base import HFAdapter
from blipserve.models.streaming import RowStreamer
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction
from helpers import make_image

#: each kind with the text its rows send (BLIP's caption prefix is part of the answer)
KINDS = {
    "blip2-opt": None,
    "blip2-t5": None,
    "blip-caption": "a picture of",
    "blip-vqa": "what is in the picture?",
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: dict[str, Path]) -> dict[str, HFAdapter]:
    loaded = {}
    for kind in KINDS:
        adapter = Engine.load(ModelConfig(model=str(tiny_model_dir[kind]))).adapter
        assert isinstance(adapter, HFAdapter)
        loaded[kind] = adapter
    return loaded


class Pieces:
    """A sink that keeps what it was given, by text index."""

    def __init__(self) -> None:
        self.got: dict[int, list[str]] = defaultdict(list)

    def __call__(self, index: int, text: str) -> None:
        self.got[index].append(text)

    def text(self, index: int = 0) -> str:
        return "".join(self.got[index])


def run(adapter: HFAdapter, items: list[ModelInput]) -> list[Prediction]:
    with torch.inference_mode():
        return adapter.predict(items)


def test_words_are_sent_whole_and_add_up_to_the_stripped_text(
    adapters: dict[str, HFAdapter],
) -> None:
    tokenizer = adapters["blip2-opt"].tokenizer
    text = " A cat, sitting on the mat. Then: naïve café ☕ end "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, quiet = Pieces(), Pieces()
    streamer = RowStreamer(tokenizer, [pieces, None], per_row=1)
    streamer.put(torch.zeros((2, 3), dtype=torch.long))  # the prompt: not streamed
    for token in ids:
        streamer.put(torch.tensor([token, token]))
        # Every piece so far is the start of the final text (nothing sent is ever taken back).
        assert text.strip().startswith(pieces.text())
    streamer.end()
    assert pieces.text() == text.strip()
    assert not quiet.got  # a row without a sink
    assert len(pieces.got[0]) > 3  # word by word, not all at the end
    assert all(piece.strip() for piece in pieces.got[0])  # no piece is only whitespace


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_of_a_batch_streams_its_own_answer(
    adapters: dict[str, HFAdapter], kind: str
) -> None:
    adapter, text = adapters[kind], KINDS[kind]
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    sinks = [Pieces(), None, Pieces()]
    items = [ModelInput(make_image(i), text, params, on_text=s) for i, s in enumerate(sinks)]
    streamed = run(adapter, items)
    plain = run(adapter, [ModelInput(make_image(i), text, params) for i in range(3)])
    assert streamed == plain  # streaming changes nothing in the answers
    for sink, prediction in zip(sinks, streamed, strict=True):
        if sink is not None:
            assert sink.text() == prediction.text
            assert list(sink.got) == [0]
            # As decoded, word by word, not whole at the end (the random T5 says one word).
            assert len(sink.got[0]) >= min(3, len(prediction.text.split()))
    if text and adapter.text_role == "prefix":
        assert all(p.text.startswith(text) for p in streamed)
        assert all(s is None or s.got[0][0].startswith(text) for s in sinks)


def test_several_samples_stream_each_with_its_index(adapters: dict[str, HFAdapter]) -> None:
    adapter = adapters["blip2-opt"]
    params = GenerationParams(
        max_new_tokens=8, min_new_tokens=8, do_sample=True, num_return_sequences=3
    )
    sinks = [Pieces(), Pieces()]
    torch.manual_seed(0)
    out = run(
        adapter, [ModelInput(make_image(i), None, params, on_text=s) for i, s in enumerate(sinks)]
    )
    for sink, prediction in zip(sinks, out, strict=True):
        assert prediction.texts is not None
        # streamed samples keep the order drawn: index i is the answer's text i
        assert [sink.text(i) for i in range(3)] == list(prediction.texts)


def test_beam_search_streams_nothing_but_answers_as_before(
    adapters: dict[str, HFAdapter],
) -> None:
    adapter = adapters["blip2-opt"]
    params = GenerationParams(max_new_tokens=6, num_beams=2)
    sink = Pieces()
    [streamed] = run(adapter, [ModelInput(make_image(0), None, params, on_text=sink)])
    [plain] = run(adapter, [ModelInput(make_image(0), None, params)])
    assert streamed == plain
    assert not sink.got  # the route sends the whole text when the search ends
