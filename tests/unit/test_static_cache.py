"""``--cuda-graphs``: decoding with a static KV cache (BLIP captioning, BLIP-2 with OPT).

A GPU compiles the decoding step into CUDA graphs; none is here, so these check what a CPU
can: the static cache says what the dynamic cache says (padding rows dropped, row order
kept), and the decoding step traces into one graph (``fullgraph=True``: a graph break,
which would split the CUDA graph and leave launches to Python, fails the test).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from blipserve.config import EngineConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.models import build_model
from blipserve.models.static_cache import cache_length, padded_rows
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction, RowInput
from helpers import client_base64, jpeg_bytes, photos

PROMPTS: dict[str, list[str | None]] = {
    # Prefixes / prompts of several token lengths; BLIP batches rows of one length.
    "blip-caption": [None, "a picture of", None, "a picture of a very small", None],
    "blip2-opt": [None, "Question: what is it? Answer:", "a photo of", None, "x"],
    # (its Q-Former reads the instruction too; no text: the caption instruction)
    "instructblip-vicuna": [None, "Question: what is it? Short answer:", "Describe it.", None, "x"],
}
#: the image tokens BLIP's cross-attention cache holds: tiny models' 32 px images, 8 px
#: patches -> 16 patches and [CLS]
TINY_IMAGE_TOKENS = 17


@pytest.fixture(scope="module")
def model_dir(
    tiny_model_dir: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The session's tiny models and a tiny InstructBLIP-Vicuna."""
    import tiny_models

    kind = "instructblip-vicuna"
    folder = tiny_models.build(kind, tmp_path_factory.mktemp("instructblip") / kind)
    return {**tiny_model_dir, kind: folder}


@pytest.fixture(scope="module")
def rows() -> list[RowInput]:
    """Photographs as JPEGs in base64 as clients write it."""
    images = list(photos().values())
    return [RowInput(i, client_base64(jpeg_bytes(images[i % len(images)]))) for i in range(5)]


def _rows(kind: str, rows: list[RowInput]) -> list[RowInput]:
    texts = PROMPTS[kind]
    return [RowInput(i, r.image, text) for i, (r, text) in enumerate(zip(rows, texts, strict=True))]


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[int]]:
    """``max_cache_len`` of each static cache made from now on, by the thread that made it:
    an engine runs batches on several model workers at once, so one ``generate`` call's
    caches are in order only within its thread."""
    from transformers.cache_utils import StaticCache

    lengths: dict[int, list[int]] = defaultdict(list)
    init = StaticCache.__init__

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        lengths[threading.get_ident()].append(kwargs["max_cache_len"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(StaticCache, "__init__", counted)
    return lengths


@pytest.fixture
def as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models load in float32 with the speed options their family gets on a GPU (not the
    CPU's int8 kernels and lean text layers, which a GPU never decodes with)."""
    from blipserve.models.registry import ADAPTERS

    for cls in set(ADAPTERS.values()):
        options = cls.speedups.__func__  # type: ignore[attr-defined]

        def on_a_gpu(
            c: Any, precision: Any, device: Any, attention: str = "auto", options: Any = options
        ) -> Any:
            return options(c, precision, torch.device("cuda"), attention)

        monkeypatch.setattr(cls, "speedups", classmethod(on_a_gpu))


def _engines(path: Path) -> tuple[Engine, Engine]:
    """The model at ``path`` in two engines: the second decodes with a static cache."""
    config = EngineConfig(max_batch_size=8)
    model = ModelConfig(model=str(path), device="cpu", dtype="float32")
    adapter = build_model(model)
    return Engine(adapter, config=config), Engine(adapter.with_static_cache(), config=config)


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_static_cache_says_what_the_dynamic_cache_says(
    model_dir: dict[str, Path],
    rows: list[RowInput],
    made: dict[int, list[int]],
    as_on_a_gpu: None,
    kind: str,
) -> None:
    # On a CPU transformers runs the static cache eagerly: the arithmetic, not the graphs.
    dynamic, static = _engines(model_dir[kind])
    asked = _rows(kind, rows)
    with dynamic, static:
        for params in (
            GenerationParams(max_new_tokens=6),
            GenerationParams(max_new_tokens=100),  # 128 positions, filled
            GenerationParams(max_new_tokens=8, num_beams=3, num_return_sequences=2),
        ):
            want = dynamic.predict(asked, params)
            assert all(isinstance(p, Prediction) for p in want)
            assert static.predict(asked, params) == want
            assert [static.predict([r], params)[0] for r in asked[:2]] == want[:2]
    # 128 positions per call; BLIP's cross-attention a cache of the image's tokens too
    each_call = [128, TINY_IMAGE_TOKENS] if kind == "blip-caption" else [128]
    assert made
    for lengths in made.values():
        assert lengths == each_call * (len(lengths) // len(each_call))


@pytest.fixture
def graphs() -> Iterator[list[torch.fx.GraphModule]]:
    """The graphs torch.compile traces from now on through :func:`_keeping`'s backend,
    dynamo's caches empty before and after."""
    torch._dynamo.reset()
    yield []
    torch._dynamo.reset()


def _keeping(graphs: list[torch.fx.GraphModule]) -> Any:
    """A torch.compile backend that keeps the graphs it is given in ``graphs`` and runs
    them as traced (no code generation: a CPU test cannot wait for inductor).  A function,
    not a partial: ``generate`` deep-copies its configuration, and a partial's list with it."""

    def keep(gm: torch.fx.GraphModule, inputs: Any, **options: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    return keep


def _compile_on_cpu(model: torch.nn.Module, backend: Any) -> None:
    """Have ``generate`` compile the decoding step here as it does on a GPU, in one graph
    or not at all (``fullgraph``); set on each (sub)model's generation config, since BLIP
    and BLIP-2 call their text model's ``generate``."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True  # (transformers' switch for testing off a GPU)
    for module in model.modules():
        generation = getattr(module, "generation_config", None)
        if generation is not None:
            generation.compile_config = config


@pytest.mark.heavy  # torch.compile
@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_the_decoding_step_is_one_graph(
    model_dir: dict[str, Path],
    rows: list[RowInput],
    graphs: list[torch.fx.GraphModule],
    as_on_a_gpu: None,
    kind: str,
) -> None:
    dynamic, static = _engines(model_dir[kind])
    _compile_on_cpu(static.adapter.model, _keeping(graphs))  # type: ignore[attr-defined]
    asked = _rows(kind, rows)
    params = GenerationParams(max_new_tokens=6)
    with dynamic, static:
        want = dynamic.predict(asked, params)
        assert static.predict(asked, params) == want
        assert graphs, "generate did not compile the decoding step"
        compiled = len(graphs)
        assert static.predict(asked, params) == want  # the same shapes: no new graph
        assert len(graphs) == compiled
        # Sampling several texts a row decodes through the compiled step too, still in one
        # graph (a break raises under fullgraph, and the rows would carry the error).
        sampled = GenerationParams(max_new_tokens=6, do_sample=True, num_return_sequences=2)
        got = static.predict(asked, sampled)
        assert all(isinstance(p, Prediction) and len(p.texts or ()) == 2 for p in got), got


def test_padding_and_lengths() -> None:
    image = next(iter(photos().values()))
    items = [ModelInput(image, str(i), GenerationParams()) for i in range(5)]
    padded = padded_rows(items)
    assert padded[:5] == items
    assert padded[5:] == [items[-1]] * 3
    assert [len(padded_rows(items[:n])) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert cache_length(1, 20) == 128  # BLIP's [DEC] and a default caption
    assert cache_length(60, 68) == 128
    assert cache_length(60, 69) == 192


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_streamed_rows_of_a_padded_batch(
    model_dir: dict[str, Path], as_on_a_gpu: None, kind: str
) -> None:
    # Three rows padded to four: the streamer sees the copy's tokens and sends nothing of
    # them; each streaming row's pieces add up to its answer.
    dynamic, static = _engines(model_dir[kind])
    params = GenerationParams(max_new_tokens=10, min_new_tokens=10)
    images = list(photos().values())
    pieces: dict[int, list[str]] = {0: [], 2: []}

    def sink(row: int) -> Any:
        return lambda index, piece: pieces[row].append(piece)

    items = [
        ModelInput(images[i], None, params, on_text=sink(i) if i in pieces else None)
        for i in range(3)
    ]
    plain = [ModelInput(item.image, None, params) for item in items]
    with dynamic, static:
        got = static.adapter.predict(items)
        assert got == dynamic.adapter.predict(plain)
    for row, sent in pieces.items():
        # in pieces, as decoded (word by word: a random model may say one long word)
        assert len(sent) >= min(2, len(got[row].text.split()))
        assert "".join(sent).strip() == got[row].text
