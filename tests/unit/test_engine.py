"""The engine over each tiny model: batched == one by one, order, errors per row."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, cast

import pytest

from blipserve.config import EngineConfig, ModelConfig
from blipserve.contracts.catalog import parse_request
from blipserve.engine import Engine
from blipserve.errors import InferenceError, InvalidInput, RowError
from blipserve.models import build_model
from blipserve.models.base import HFAdapter
from blipserve.params import GenerationParams
from blipserve.types import Prediction, RowInput
from helpers import b64_png

PARAMS = GenerationParams(max_new_tokens=6)
PROMPTS: dict[str, list[str | None]] = {
    # Prefixes / prompts of different token lengths: the padding traps of each family.
    "blip-caption": [None, "a picture of", "a", "a picture of a very small", None, "a dog"],
    "blip-vqa": [
        "what is it?",
        "how many objects are there in the image?",
        "color?",
        "what is on the left of the red square?",
        "where?",
        "what is it?",
    ],
    "blip-itm": [
        "a dog",
        "two red squares on a blue background",
        "x",
        "a cat on a mat",
        "nothing",
        "a dog",
    ],
    "blip2-opt": [
        None,
        "Question: what is it? Answer:",
        "a photo of",
        "Question: how many objects are in this picture? Answer:",
        None,
        "x",
    ],
    "blip2-t5": [
        None,
        "Question: what is it? Answer:",
        "a photo of",
        "Question: how many objects are in this picture? Answer:",
        None,
        "x",
    ],
}


@pytest.fixture(scope="module")
def engines(tiny_model_dir: dict[str, Path]) -> dict[str, Engine]:
    return {
        kind: Engine.load(ModelConfig(model=str(path)), config=EngineConfig(max_batch_size=8))
        for kind, path in tiny_model_dir.items()
    }


def rows_for(kind: str) -> list[RowInput]:
    return [RowInput(i, b64_png(i), text) for i, text in enumerate(PROMPTS[kind])]


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_batched_equals_one_by_one(engines: dict[str, Engine], kind: str) -> None:
    engine = engines[kind]
    rows = rows_for(kind)
    batched = engine.predict(rows, PARAMS)
    single = [engine.predict([row], PARAMS)[0] for row in rows]
    assert all(isinstance(p, Prediction) for p in batched)
    assert batched == single
    # and it is deterministic
    assert engine.predict(rows, PARAMS) == batched


@pytest.mark.parametrize("kind", ["blip2-opt", "blip2-t5"])
def test_blip2_never_echoes_the_prompt(engines: dict[str, Engine], kind: str) -> None:
    engine = engines[kind]
    prompt = "Question: what is shown in this picture, in detail? Answer:"
    params = GenerationParams(max_new_tokens=3, min_new_tokens=3)
    [out] = engine.predict([RowInput(0, b64_png(1), prompt)], params)
    assert isinstance(out, Prediction)
    # at most 3 generated tokens; the prompt alone is 14
    tokenizer = cast(Any, engine.adapter).tokenizer
    assert len(tokenizer(out.text, add_special_tokens=False)["input_ids"]) <= 3


def test_blip_caption_includes_its_prefix(engines: dict[str, Engine]) -> None:
    [out] = engines["blip-caption"].predict([RowInput(0, b64_png(1), "A Picture of")], PARAMS)
    assert isinstance(out, Prediction)
    assert out.text.startswith("a picture of")  # the BERT tokenizer lower-cases


def test_max_new_tokens_takes_effect(engines: dict[str, Engine]) -> None:
    engine = engines["blip-caption"]
    row = RowInput(0, b64_png(2))
    lengths = []
    for n in (2, 8):
        params = GenerationParams(max_new_tokens=n, min_new_tokens=n)
        [out] = engine.predict([row], params)
        assert isinstance(out, Prediction)
        tokenizer = cast(Any, engine.adapter).tokenizer
        lengths.append(len(tokenizer(out.text, add_special_tokens=False)["input_ids"]))
    assert lengths[0] < lengths[1]


def test_itm_returns_probability_as_text_and_number(engines: dict[str, Engine]) -> None:
    outs = engines["blip-itm"].predict(rows_for("blip-itm"))
    for out in outs:
        assert isinstance(out, Prediction)
        assert out.score is not None
        assert 0.0 <= out.score <= 1.0
        assert out.text == f"{out.score:.4f}"


@pytest.mark.parametrize(("kind", "needs"), [("blip-vqa", "question"), ("blip-itm", "text")])
def test_text_required(engines: dict[str, Engine], kind: str, needs: str) -> None:
    [out] = engines[kind].predict([RowInput(0, b64_png(0))])
    assert isinstance(out, RowError)
    assert out.row == 0
    assert needs in out.reason


def test_bad_rows_do_not_spoil_good_ones(engines: dict[str, Engine]) -> None:
    engine = engines["blip-caption"]
    rows = [RowInput(0, b64_png(0)), RowInput(1, "bm90IGFuIGltYWdl"), RowInput(2, b64_png(2))]
    outs = engine.predict(rows, PARAMS)
    assert isinstance(outs[0], Prediction)
    assert isinstance(outs[1], RowError)
    assert outs[1].row == 1
    assert outs[2] == engine.predict([rows[2]], PARAMS)[0]


def test_score_raises_naming_the_bad_row(engines: dict[str, Engine]) -> None:
    body = {
        "input_data": {
            "columns": ["image"],
            "index": [10, 11, 12],
            "data": [[b64_png(0)], ["%%%"], [b64_png(1)]],
        }
    }
    with pytest.raises(RowError, match=r"^row 1 \(index 11\): .*base64"):
        engines["blip-caption"].score(parse_request(body))


def test_score_lists_several_bad_rows(engines: dict[str, Engine]) -> None:
    body = {"input_data": {"columns": ["image"], "data": [["%%%"], [b64_png(0)], ["@@"]]}}
    with pytest.raises(InvalidInput, match=r"^2 rows are invalid: row 0: .*; row 2: "):
        engines["blip-caption"].score(parse_request(body))


def test_score_keeps_row_order(engines: dict[str, Engine]) -> None:
    engine = engines["blip2-opt"]
    data = [[b64_png(i, lines=True), text] for i, text in enumerate(PROMPTS["blip2-opt"])]
    body = {
        "input_data": {"columns": ["image", "text"], "data": data},
        "params": {"max_new_tokens": 4},
    }
    answers = engine.score(parse_request(body))
    one_by_one = [
        engine.score(
            parse_request(
                {
                    "input_data": {"columns": ["image", "text"], "data": [row]},
                    "params": {"max_new_tokens": 4},
                }
            )
        )[0]
        for row in data
    ]
    assert answers == one_by_one


def test_model_failure_fails_only_its_batch(
    engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engines["blip-caption"]
    real = engine.adapter.predict

    def flaky(items):  # type: ignore[no-untyped-def]
        if any(item.text == "boom" for item in items):
            raise RuntimeError("simulated CUDA error")
        return real(items)

    monkeypatch.setattr(engine.adapter, "predict", flaky)
    rows = [RowInput(0, b64_png(0)), RowInput(1, b64_png(1), "boom")]
    outs = engine.predict(rows, PARAMS)
    assert isinstance(outs[0], Prediction)
    assert isinstance(outs[1], InferenceError)
    assert "simulated CUDA error" in outs[1].message
    # and the engine keeps working
    assert isinstance(engine.predict([rows[0]], PARAMS)[0], Prediction)


@pytest.mark.parametrize("kind", ["blip-caption", "blip-vqa", "blip2-opt", "blip2-t5"])
def test_generated_tokens_are_counted(engines: dict[str, Engine], kind: str) -> None:
    # min == max forces exactly n new tokens: the count must not include prompt or padding.
    rows = rows_for(kind)[:4]
    for n in (2, 5):
        params = GenerationParams(max_new_tokens=n, min_new_tokens=n)
        for out in engines[kind].predict(rows, params):
            assert isinstance(out, Prediction)
            assert out.tokens == n


def test_batch_size_zero_picks_by_device(tiny_model_dir: dict[str, Path]) -> None:
    import torch

    from blipserve.engine import default_batch_size

    assert default_batch_size(torch.device("cpu")) == 8
    assert default_batch_size(torch.device("cuda")) == 64
    path = tiny_model_dir["blip-caption"]
    with Engine.load(ModelConfig(model=str(path), device="cpu"), config=EngineConfig()) as engine:
        assert engine.max_batch_size == 8
    with Engine.load(ModelConfig(model=str(path)), config=EngineConfig(max_batch_size=3)) as e:
        assert e.max_batch_size == 3


@pytest.mark.parametrize(
    "bad", [{"max_batch_size": -1}, {"torch_threads": -2}, {"decode_workers": -1}]
)
def test_engine_config_refuses_nonsense(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        EngineConfig(**bad)


def test_cuda_graphs_are_refused_where_they_cannot_work(
    tiny_model_dir: dict[str, Path],
) -> None:
    from blipserve.errors import ModelLoadError

    for kind in ("blip-caption", "blip2-opt", "blip2-t5"):
        with pytest.raises(ModelLoadError, match="--cuda-graphs needs a CUDA GPU"):
            build_model(
                ModelConfig(model=str(tiny_model_dir[kind]), device="cpu", cuda_graphs=True)
            )
    # (static caches: tests/unit/test_static_cache.py)
    for kind in ("blip-vqa", "blip-itm", "blip2-t5"):
        adapter = build_model(ModelConfig(model=str(tiny_model_dir[kind]), device="cpu"))
        assert isinstance(adapter, HFAdapter)
        why = adapter.static_cache_refusal(adapter.model.config) or ""
        assert re.search(r"BLIP captioning models and BLIP-2 .* \(OPT, Vicuna\)", why), why


def test_model_workers_by_device() -> None:
    import torch

    from blipserve.engine import default_model_workers

    assert default_model_workers(torch.device("cpu"), 2) == 2
    assert default_model_workers(torch.device("cpu"), 16) == 2
    assert default_model_workers(torch.device("cpu"), 1) == 1
    assert default_model_workers(torch.device("cuda"), 16) == 1


def test_decode_workers_by_device() -> None:
    import torch

    from blipserve.engine import default_decode_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [default_decode_workers(cpu, n) for n in (2, 16)] == [4, 4]  # the model's cores
    assert [default_decode_workers(gpu, n) for n in (2, 8, 16, 64)] == [4, 8, 16, 16]
    assert default_decode_workers(gpu) >= 4  # (this machine's usable cores)


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "50000 100000\n"}, 1),  # cgroup v2: half a CPU -> 1
        ({"cpu.max": "max 100000\n"}, None),  # no quota: the cores it may run on
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_usable_cores_count_a_containers_quota(
    tmp_path: Path, files: dict[str, str], cores: int | None
) -> None:
    import os

    from blipserve.engine.run import usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    everything = len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path)) == min(cores or everything, everything)


def test_two_model_workers_share_the_torch_threads(tiny_model_dir: dict[str, Path]) -> None:
    # Three batches of two rows on two model workers: the same outcomes, in row order, as
    # one worker; never more than two batches in the model, and while two overlap each
    # runs on one torch thread of two (the caller's thread gets its count back).
    import threading

    import torch

    original = torch.get_num_threads()  # torch_threads=2 below sets it process-wide
    path = str(tiny_model_dir["blip-caption"])
    rows = [RowInput(i, b64_png(i)) for i in range(6)]
    with Engine.load(
        ModelConfig(model=path, device="cpu"), config=EngineConfig(max_batch_size=2)
    ) as one:
        one_worker = EngineConfig(max_batch_size=2, model_workers=1)
        want = Engine(one.adapter, config=one_worker).predict(rows, PARAMS)
    engine = Engine.load(
        ModelConfig(model=path, device="cpu"),
        config=EngineConfig(max_batch_size=2, model_workers=2, torch_threads=2),
    )
    predict = engine.adapter.predict
    seen: list[tuple[int, int]] = []  # (batches in the model, this thread's torch threads)
    inside = 0
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=10)

    def watched(items):  # type: ignore[no-untyped-def]
        nonlocal inside
        with lock:
            inside += 1
            now = inside
        if len(seen) < 2:
            both.wait()  # the first two batches meet inside the model
        seen.append((now, torch.get_num_threads()))
        try:
            return predict(items)
        finally:
            with lock:
                inside -= 1

    engine.adapter.predict = watched  # type: ignore[method-assign]
    before = torch.get_num_threads()
    try:
        with engine:
            assert engine.model_workers == 2
            got = engine.predict(rows, PARAMS)
            assert len(seen) == 3
            engine.predict(rows[:1], PARAMS)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(original)
    assert got == want
    assert max(n for n, _ in seen) == 2
    assert sorted(seen[:2]) == [(1, 1), (2, 1)]  # overlapping: one torch thread each
    assert seen[3] == (1, 2)  # a call of one batch runs alone on every thread
    assert after == before


@pytest.mark.heavy  # torch.compile
def test_warm_up_compiles_every_padded_batch_size_with_cuda_graphs(
    tiny_model_dir: dict[str, Path],
) -> None:
    # --cuda-graphs compiles a decoding step per batch size on first use: warm-up runs each
    # size the adapter pads to (1, 2, 4, and max_batch_size 6, padded to 8) so that no
    # request waits for it.  Without it, one row of 2 tokens.
    path = str(tiny_model_dir["blip2-opt"])
    for static, want in ((False, [(1, 2)]), (True, [(1, None), (2, None), (4, None), (6, None)])):
        adapter = build_model(ModelConfig(model=path, device="cpu"))
        engine = Engine(adapter.with_static_cache(static), config=EngineConfig(max_batch_size=6))
        predict = engine.adapter.predict
        seen: list[tuple[int, int | None]] = []

        def watched(items, predict=predict, seen=seen):  # type: ignore[no-untyped-def]
            seen.append((len(items), items[0].params.max_new_tokens))
            return predict(items)

        engine.adapter.predict = watched  # type: ignore[method-assign]
        with engine:
            engine.warm_up()
        assert seen == want


@pytest.mark.parametrize("kind", ["blip-caption", "blip-itm", "blip2-opt", "blip2-t5"])
def test_vision_batch_size_splits_the_encoder_not_the_batch(
    tiny_model_dir: dict[str, Path], kind: str
) -> None:
    # --vision-batch-size 2: the decoder gets the batch of 5 rows in one call, the vision
    # encoder 2 + 2 + 1 images; the answers are what the whole batch gets.
    path = str(tiny_model_dir[kind])
    config = EngineConfig(max_batch_size=8)
    whole = Engine.load(ModelConfig(model=path, device="cpu", dtype="float32"), config=config)
    split = Engine.load(
        ModelConfig(model=path, device="cpu", dtype="float32", vision_batch_size=2), config=config
    )
    seen: list[int] = []  # images per vision encoder call, as its embeddings see them
    embeddings = split.adapter.model.vision_model.embeddings  # type: ignore[attr-defined]
    embeddings.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(len([*args, *kwargs.values()][0])),
        with_kwargs=True,
    )
    rows = [RowInput(i, b64_png(i), "a dog" if kind.endswith("itm") else None) for i in range(5)]
    with whole, split:
        assert split.predict(rows, PARAMS) == whole.predict(rows, PARAMS)
    assert seen == [2, 2, 1]


def test_vision_batch_size_is_refused_where_it_cannot_apply(
    tiny_model_dir: dict[str, Path],
) -> None:
    from blipserve.errors import ModelLoadError

    path = str(tiny_model_dir["blip-caption"])
    int8 = ModelConfig(model=path, device="cpu", dtype="int8", vision_batch_size=2)
    with pytest.raises(ModelLoadError, match=r"--vision-batch-size: .* runs on OpenVINO"):
        build_model(dataclasses.replace(int8, backend="openvino"))
    with pytest.raises(ModelLoadError, match=r"--vision-batch-size: .* one image per call"):
        build_model(dataclasses.replace(int8, backend="torch"))
    with pytest.raises(ValueError, match="vision_batch_size must be >= 0"):
        ModelConfig(model=path, vision_batch_size=-1)
