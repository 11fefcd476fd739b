"""InstructBLIP on tiny random models (Vicuna: LLaMA, decoder-only; Flan-T5: encoder-decoder).

Built from transformers' configuration classes and saved with ``save_pretrained``
(tests/tiny_models.py), loaded by ``build_model`` as any folder or hub id is; the
instruction reaches both the Q-Former and the language model; batched == one by one
through the engine, on photographs decoded as requests' images are.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_models
from blipserve.config import EngineConfig, ModelConfig, ServerConfig, Settings
from blipserve.engine import Engine
from blipserve.models import build_model, int8_linear
from blipserve.models.base import HFAdapter
from blipserve.models.instructblip import CAPTION_INSTRUCTION, InstructBlipAdapter
from blipserve.models.precision import amx_bf16
from blipserve.params import GenerationParams
from blipserve.server.app import ServerState, create_app
from blipserve.types import ModelInput, Prediction, RowInput
from helpers import b64_png, jpeg_bytes, make_image, photos

KINDS = ("instructblip-vicuna", "instructblip-t5")
PARAMS = GenerationParams(max_new_tokens=6)
TEXTS = [
    None,
    InstructBlipAdapter.question_prompt("what is in the picture?"),
    "Describe this image in detail.",
    InstructBlipAdapter.chat_prompt("and the colour?", [("what is it?", "a cat")]),
    "x",
    None,
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("instructblip")
    return {kind: tiny_models.build(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, InstructBlipAdapter]:
    """Each model loaded as ``blipserve serve --model FOLDER`` loads it (dtype auto)."""
    out = {}
    for kind, folder in folders.items():
        adapter = build_model(ModelConfig(model=str(folder)))
        assert isinstance(adapter, InstructBlipAdapter)
        out[kind] = adapter
    return out


def engine_over(adapter: HFAdapter, max_batch_size: int) -> Engine:
    return Engine(adapter, config=EngineConfig(max_batch_size=max_batch_size))


def photo_rows() -> list[RowInput]:
    """Photographs as a client sends them (base64 JPEG), one text each."""
    images = [base64.b64encode(jpeg_bytes(p)).decode() for p in photos().values()]
    return [
        RowInput(i, image, text) for i, (image, text) in enumerate(zip(images, TEXTS, strict=True))
    ]


# -- prompting (the adapter class; no model) -------------------------------------------------


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("what is it?", "Question: what is it? Short answer:"),
        ("Question: what is it? Short answer:", "Question: what is it? Short answer:"),
        ("What is it? answer:", "What is it? answer:"),  # a full prompt already
    ],
)
def test_question_prompt_is_lavis_vqa_template(question: str, expected: str) -> None:
    assert InstructBlipAdapter.question_prompt(question) == expected


def test_chat_prompt() -> None:
    assert InstructBlipAdapter.chat_prompt(None, []) is None
    assert InstructBlipAdapter.chat_prompt(None, [("what?", "a cat")]) is None
    # a first question is a plain instruction: the model answers at the length asked for
    assert InstructBlipAdapter.chat_prompt("What is unusual here?", []) == "What is unusual here?"
    history = [("what is it?", "a cat"), ("", "hm")]
    assert InstructBlipAdapter.chat_prompt("what colour?", history) == (
        "Question: what is it? Answer: a cat. hm. Question: what colour? Short answer:"
    )


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "decoder_only"), [(KINDS[0], True), (KINDS[1], False)])
def test_loads_through_the_registry_in_the_default_dtype(
    adapters: dict[str, InstructBlipAdapter], kind: str, decoder_only: bool
) -> None:
    adapter = adapters[kind]
    assert adapter.kind == "instructblip"
    assert adapter.decoder_only is decoder_only
    assert adapter.image_size == 32
    assert not adapter.model.training
    # dtype auto on a CPU: int8 (every Linear layer: vision, Q-Former, LLaMA / T5) where
    # torch has the int8 kernels, HFAdapter's default speedups; on CPUs with AMX the vision
    # encoder's stay in bf16
    if int8_linear.int8_available() is None:
        assert str(adapter.precision) == "int8"
        vision = [m for m in adapter.model.vision_model.modules() if type(m) is torch.nn.Linear]
        assert bool(vision) == amx_bf16(torch.device("cpu"))
        linears = [m for m in adapter.model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == len(vision)
    item = ModelInput(make_image(0), None, PARAMS)
    [out] = adapter.predict([item])
    assert out.text
    assert out.tokens is not None
    assert 0 < out.tokens <= 6


def test_cuda_graphs_only_with_a_decoder_only_language_model(
    adapters: dict[str, InstructBlipAdapter],
) -> None:
    # (Vicuna's static cache: tests/unit/test_static_cache.py)
    t5, vicuna = adapters["instructblip-t5"], adapters["instructblip-vicuna"]
    assert "does not support it" in (t5.static_cache_refusal(t5.model.config) or "")
    assert vicuna.static_cache_refusal(vicuna.model.config) is None


# -- what the model is given -------------------------------------------------------------------


def generate_inputs(
    adapter: InstructBlipAdapter, items: list[ModelInput], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The keyword arguments ``predict`` passes to the model's ``generate``."""
    seen: dict[str, Any] = {}
    real = adapter.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(adapter.model, "generate", spy)
    adapter.predict(items)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_instruction_reaches_qformer_and_language_model(
    adapters: dict[str, InstructBlipAdapter], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = adapters[kind]
    question = adapter.question_prompt("how many cats?")
    items = [ModelInput(make_image(i), text, PARAMS) for i, text in enumerate([None, question])]
    seen = generate_inputs(adapter, items, monkeypatch)
    qformer = adapter.processor.qformer_tokenizer
    assert qformer.batch_decode(seen["qformer_input_ids"], skip_special_tokens=True) == [
        "a short image caption.",  # BERT lower-cases
        "question : how many cats? short answer :",
    ]
    mask = seen["qformer_attention_mask"]
    assert mask[0, -1] == 0  # the shorter one is padded on the right
    assert mask[1].all()
    queries = adapter.model.config.num_query_tokens
    image_token = adapter.model.config.image_token_index
    prompts = zip(seen["input_ids"], seen["attention_mask"], strict=True)
    for (row, real), text in zip(prompts, [CAPTION_INSTRUCTION, question], strict=True):
        ids = row[real.bool()].tolist()
        assert ids[:queries] == [image_token] * queries
        assert adapter.tokenizer.decode(ids[queries:], skip_special_tokens=True) == text


def test_long_instruction_is_cut_for_the_qformer(
    adapters: dict[str, InstructBlipAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny Q-Former has 64 positions: past them its embeddings would fail the batch.
    adapter = adapters["instructblip-t5"]
    text = "describe " * 100
    seen = generate_inputs(adapter, [ModelInput(make_image(0), text, PARAMS)], monkeypatch)
    assert seen["qformer_input_ids"].shape == (1, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_caption_uses_the_caption_instruction(
    adapters: dict[str, InstructBlipAdapter], kind: str
) -> None:
    adapter = adapters[kind]
    image = make_image(3)
    plain, instructed, other = adapter.predict(
        [ModelInput(image, text, PARAMS) for text in (None, CAPTION_INSTRUCTION, "Why?")]
    )
    assert plain == instructed
    assert plain != other  # (the instruction matters, even to random weights)
    assert adapter.count_tokens(None) == adapter.count_tokens(CAPTION_INSTRUCTION) > 0


# -- through the engine --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one_on_photographs(
    adapters: dict[str, InstructBlipAdapter], kind: str
) -> None:
    rows = photo_rows()
    adapter = adapters[kind]
    with (
        engine_over(adapter, 4) as batched,
        engine_over(adapter, 1) as single,
    ):
        got = batched.predict(rows, PARAMS)
        assert all(isinstance(p, Prediction) for p in got)
        assert got == single.predict(rows, PARAMS)
        assert got == [single.predict([row], PARAMS)[0] for row in rows]
    assert len({p.text for p in got if isinstance(p, Prediction)}) > 1


@pytest.mark.parametrize("kind", KINDS)
def test_several_texts_per_row(adapters: dict[str, InstructBlipAdapter], kind: str) -> None:
    rows = [RowInput(i, b64_png(i), text) for i, text in enumerate(TEXTS[:3])]
    params = GenerationParams(max_new_tokens=4, num_beams=3, num_return_sequences=3)
    with engine_over(adapters[kind], 4) as engine:
        got = engine.predict(rows, params)
        for out in got:
            assert isinstance(out, Prediction)
            assert out.texts is not None
            assert len(out.texts) == 3
            assert out.texts[0] == out.text
        assert got == [engine.predict([row], params)[0] for row in rows]


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[tuple[Any, Engine]]:
    """The app over InstructBLIP-Vicuna in float32, and an engine over the same folder."""
    from starlette.testclient import TestClient

    model = ModelConfig(model=str(folders[KINDS[0]]), dtype="float32", backend="torch")
    app = create_app(Settings(model=model, server=ServerConfig(warmup=False)))
    state = app.state.blipserve
    assert isinstance(state, ServerState)
    state.load()
    with Engine.load(model) as engine:
        yield TestClient(app), engine
    state.shutdown()


def test_score_and_chat_routes_prompt_as_the_adapter(server: tuple[Any, Engine]) -> None:
    client, engine = server
    image = b64_png(5)
    params = {"max_new_tokens": 5}
    body = {"input_data": {"columns": ["image"], "data": [[image]]}, "params": params}
    [caption] = client.post("/score", json=body).json()
    [want] = engine.predict([RowInput(0, image)], GenerationParams(**params))
    assert isinstance(want, Prediction)
    assert caption == {"text": want.text}

    url = f"data:image/png;base64,{image}"
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "What colour is it?"},
    ]
    body = {"model": "instructblip", "messages": messages, "max_tokens": 5}
    answer = client.post("/v1/chat/completions", json=body).json()
    prompt = InstructBlipAdapter.chat_prompt("What colour is it?", [("What is this?", "a cat")])
    [want] = engine.predict([RowInput(0, image, prompt)], GenerationParams(**params))
    assert isinstance(want, Prediction)
    assert answer["choices"][0]["message"]["content"] == want.text
    assert answer["usage"]["prompt_tokens"] == engine.adapter.count_tokens(prompt)
