"""Several texts per row (``num_return_sequences``) and the repetition guard
(``no_repeat_ngram_size``) through the engine on each tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from blipserve.config import EngineConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.errors import InvalidInput, InvalidRequest, RowError
from blipserve.models.base import HFAdapter
from blipserve.models.blip2 import Blip2Adapter
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Outcome, Prediction, RowInput
from helpers import b64_png, make_image

GENERATIVE = ["blip-caption", "blip-vqa", "blip2-opt", "blip2-t5"]
TEXT = {"blip-caption": None, "blip-vqa": "what is it?", "blip2-opt": None, "blip2-t5": None}


@pytest.fixture(scope="module")
def engines(tiny_model_dir: dict[str, Path]) -> dict[str, Engine]:
    return {
        kind: Engine.load(ModelConfig(model=str(path)), config=EngineConfig(max_batch_size=8))
        for kind, path in tiny_model_dir.items()
    }


def rows(kind: str, n: int = 3) -> list[RowInput]:
    return [RowInput(i, b64_png(i), TEXT[kind]) for i in range(n)]


def predictions(outcomes: list[Outcome]) -> list[Prediction]:
    assert all(isinstance(o, Prediction) for o in outcomes), outcomes
    return [o for o in outcomes if isinstance(o, Prediction)]


def adapter_of(engine: Engine) -> HFAdapter:
    assert isinstance(engine.adapter, HFAdapter)
    return engine.adapter


@pytest.mark.parametrize("kind", GENERATIVE)
def test_best_beams_first_and_the_single_answer_unchanged(
    engines: dict[str, Engine], kind: str
) -> None:
    engine = engines[kind]
    single = predictions(
        engine.predict(rows(kind), GenerationParams(max_new_tokens=6, num_beams=3))
    )
    several = GenerationParams(max_new_tokens=6, num_beams=3, num_return_sequences=3)
    batched = predictions(engine.predict(rows(kind), several))
    for one, many in zip(single, batched, strict=True):
        assert one.texts is None  # one asked for: the answer as it always was
        assert many.texts is not None
        assert many.texts_tokens is not None
        assert len(many.texts) == 3 == len(set(many.texts))
        assert many.text == many.texts[0] == one.text
        assert many.tokens == many.texts_tokens[0] == one.tokens
        assert many.to_json() == {"text": one.text, "texts": list(many.texts)}
    # batched == one by one, with several texts per row as with one
    alone = [predictions(engine.predict([row], several))[0] for row in rows(kind)]
    assert alone == batched


@pytest.mark.parametrize("kind", GENERATIVE)
def test_samples_are_independent(engines: dict[str, Engine], kind: str) -> None:
    params = GenerationParams(max_new_tokens=6, do_sample=True, num_return_sequences=4)
    torch.manual_seed(0)
    for out in predictions(engines[kind].predict(rows(kind, 2), params)):
        assert out.texts is not None
        assert len(out.texts) == 4
        assert len(set(out.texts)) > 1  # (a random model's samples differ)
        assert out.text == out.texts[0]


def test_samples_come_best_first(engines: dict[str, Engine]) -> None:
    """Ordered by mean log-probability, as transformers' own transition scores give it."""
    adapter = engines["blip2-opt"].adapter
    assert isinstance(adapter, Blip2Adapter)
    params = GenerationParams(max_new_tokens=6, do_sample=True, num_return_sequences=5)
    items = [ModelInput(make_image(i), None, params) for i in range(3)]
    torch.manual_seed(1)
    got = adapter.predict(items)

    torch.manual_seed(1)  # the same samples again, as drawn
    input_ids, attention_mask = adapter.encode_prompts(items)
    drawn = adapter.model.generate(
        pixel_values=adapter.pixel_values(items),
        input_ids=input_ids,
        attention_mask=attention_mask,
        **adapter.generate_kwargs(params),
        return_dict_in_generate=True,
        output_logits=True,
    )
    logprobs = adapter.model.compute_transition_scores(
        drawn.sequences, drawn.logits, normalize_logits=True
    )  # (B * 5, S)
    new = drawn.sequences[:, input_ids.shape[1] :]
    real = adapter.generated(new)
    mean = (logprobs * real).sum(dim=1) / real.sum(dim=1)
    texts = [t.strip() for t in adapter.tokenizer.batch_decode(new, skip_special_tokens=True)]
    reordered = 0
    for row, prediction in enumerate(got):
        span = range(5 * row, 5 * row + 5)
        best_first = sorted(span, key=lambda i: -float(mean[i]))
        assert prediction.texts == tuple(texts[i] for i in best_first)
        reordered += best_first != list(span)
    assert reordered  # drawn order is not already best first (else this shows nothing)


def test_generated_tokens_exclude_what_beam_search_fills_in(engines: dict[str, Engine]) -> None:
    # Beam search fills a finished beam with its end token (greedy search pads): neither
    # counts.  A model whose first token is its end token generates one token.
    adapter = adapter_of(engines["blip2-opt"])
    [end] = adapter.end_token_ids()
    pad = adapter.tokenizer.pad_token_id
    new = torch.tensor([[7, 8, end, end, end], [7, end, pad, pad, pad], [end, end, 7, 8, 9]])
    assert adapter.generated(new).sum(dim=1).tolist() == [3, 2, 1]


@pytest.mark.parametrize("kind", ["blip2-opt", "blip2-t5"])
def test_no_repeat_ngram_size_reaches_generate(engines: dict[str, Engine], kind: str) -> None:
    # These random models repeat a word over and over; the guard forbids any repeat.
    engine = engines[kind]
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    repeats = [p.text.split() for p in predictions(engine.predict(rows(kind), params))]
    assert any(len(set(words)) < len(words) for words in repeats)
    guarded = GenerationParams(max_new_tokens=12, min_new_tokens=12, no_repeat_ngram_size=1)
    for prediction in predictions(engine.predict(rows(kind), guarded)):
        words = prediction.text.split()
        assert len(set(words)) == len(words), prediction.text


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        (
            "blip-caption",
            GenerationParams(num_return_sequences=2),
            r"num_return_sequences \(2\) needs beam search \(num_beams of at least 2\) or "
            r"sampling .* decodes greedily by default",
        ),
        (
            "blip2-opt",
            GenerationParams(num_return_sequences=3, num_beams=1),
            r"num_return_sequences \(3\) needs beam search",
        ),
        ("blip-itm", GenerationParams(num_return_sequences=2), "num_return_sequences .* must be 1"),
    ],
)
def test_several_texts_the_model_cannot_give_are_refused_once_for_the_request(
    engines: dict[str, Engine], kind: str, params: GenerationParams, message: str
) -> None:
    text = "a dog" if kind == "blip-itm" else None
    rows = [RowInput(i, b64_png(i), text) for i in range(3)]
    with pytest.raises(InvalidRequest) as raised:
        engines[kind].predict(rows, params)
    assert raised.value.status == 400
    assert not isinstance(raised.value, RowError)  # the request's parameters, not a row
    assert re.search(message, raised.value.message), raised.value.message
    # A row that reaches the model some other way (a Ray actor's chunk) is still refused
    # alone rather than failing its whole batch in generate.
    [prepared] = engines[kind].prepare_all(rows[:1], params)
    assert isinstance(prepared, RowError)
    assert re.search(message, prepared.message), prepared.message


def test_more_texts_than_the_default_beams_is_refused(engines: dict[str, Engine]) -> None:
    adapter = adapter_of(engines["blip-caption"])
    config = adapter.model.generation_config
    config.num_beams = 2
    try:
        with pytest.raises(
            InvalidInput, match=r"must not exceed num_beams \(2, this model's default"
        ):
            adapter.check_params(GenerationParams(num_return_sequences=3))
        adapter.check_params(GenerationParams(num_return_sequences=2))  # two beams: fine
    finally:
        config.num_beams = None
