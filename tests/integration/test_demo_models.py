"""The built-in demo models, loaded by name as a user loads them, know their scenes.

Scenes are generated here from the held-out seed (never trained on), at indices away from
the 500 the model cards were measured on, and go through the public path: ``--model demo``
/ ``Engine.load(ModelConfig(model="demo"))``, base64 PNG rows, the engine's batching.
The sample is fixed (scenes are deterministic), so these thresholds do not flake.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blipserve.config import EngineConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.finetune.scenes import HELDOUT_SEED, PROMPT_FORMS, Scene, generate, prompt_in_form
from blipserve.models import int8_linear, openvino_vision
from blipserve.types import Outcome, Prediction, RowInput

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = 200  # scenes per check: a few seconds on two CPU cores
START = 5_000  # held-out indices 5000.. (the model cards use 0..499, examples 10000..)
# The targets (exact captions: `demo` 95%, `demo-vqa` 90%; `demo-vqa` answers 90%),
# on this smaller sample.  Measured on it: `demo` captions 97.5%; `demo-vqa` captions 96.5%,
# answers 92.2% of 1305 (its model card, 500 scenes: 94.4% and 93.3%).
CAPTION_TARGET = {"demo": 0.95, "demo-vqa": 0.90}
ANSWER_TARGET = 0.90
OPEN_TARGET = 0.90  # "What is in the picture? Answer: " answered with the exact caption
# Speed modes must say the same thing (issue 6's quality guard).
SAME_AS_FLOAT32 = 0.98
# ... and with the vision encoder on OpenVINO, at least 99% (issue 19).
SAME_AS_FLOAT32_OPENVINO = 0.99


def b64(scene: Scene) -> str:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return list(generate(HELDOUT_SEED, SAMPLE, start=START))


def load(name: str, dtype: str = "float32", backend: str = "torch") -> Engine:
    return Engine.load(
        ModelConfig(model=name, device="cpu", dtype=dtype, backend=backend),  # type: ignore[arg-type]
        config=EngineConfig(max_batch_size=32),
    )


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Engine]]:
    """float32 on torch: transformers' own arithmetic, the reference of every speed mode."""
    loaded = {name: load(name) for name in ("demo", "demo-vqa")}
    yield loaded
    for engine in loaded.values():
        engine.close()


def texts(outcomes: list[Outcome]) -> list[str]:
    out = []
    for outcome in outcomes:
        assert isinstance(outcome, Prediction), outcome
        out.append(outcome.text)
    return out


def exact(said: list[str], truth: list[str]) -> float:
    return sum(" ".join(a.split()) == b for a, b in zip(said, truth, strict=True)) / len(truth)


def report(what: str, said: list[str], truth: list[str]) -> float:
    rate = exact(said, truth)
    wrong = [(b, a) for a, b in zip(said, truth, strict=True) if " ".join(a.split()) != b]
    print(f"{what}: {rate:.1%} exact on {len(truth)}; first misses: {wrong[:3]}")
    return rate


@pytest.mark.parametrize("name", ["demo", "demo-vqa"])
def test_captions(engines: dict[str, Engine], scenes: list[Scene], name: str) -> None:
    said = texts(engines[name].predict([RowInput(i, b64(s)) for i, s in enumerate(scenes)]))
    rate = report(f"{name} captions", said, [s.caption for s in scenes])
    assert rate >= CAPTION_TARGET[name]


def test_vqa_answers(engines: dict[str, Engine], scenes: list[Scene]) -> None:
    # Every question of every scene (about 6.5 per scene, all kinds), as the model card
    # counts them: ~1300 answers, so the 90% floor is not at the mercy of a few dozen.
    qas = [(s, qa) for s in scenes for qa in s.qa]
    rows = [RowInput(i, b64(s), qa.prompt) for i, (s, qa) in enumerate(qas)]
    said = texts(engines["demo-vqa"].predict(rows))
    rate = report("demo-vqa answers", said, [qa.answer for _, qa in qas])
    assert rate >= ANSWER_TARGET


FORM_SAMPLE = 100  # questions per prompt form: under a minute for all of them
FORM_START = 6_000  # held-out scenes away from the cards' and the checks' above


@pytest.mark.parametrize("form", list(PROMPT_FORMS))
def test_vqa_answers_in_each_prompt_form(engines: dict[str, Engine], form: str) -> None:
    """Questions as clients send them (issue 21): ``Question: q Answer:``, the catalog
    sample's ``q Answer: `` and the bare question, in varied case and trailing spaces."""
    qas = [(s, qa) for s in generate(HELDOUT_SEED, 40, start=FORM_START) for qa in s.qa]
    qas = qas[:FORM_SAMPLE]
    rows = [
        RowInput(i, b64(s), prompt_in_form(qa.question, form, random.Random(i)))
        for i, (s, qa) in enumerate(qas)
    ]
    said = texts(engines["demo-vqa"].predict(rows))
    rate = report(f"demo-vqa answers, form {form}", said, [qa.answer for _, qa in qas])
    assert rate >= ANSWER_TARGET


def test_vqa_open_question_gets_the_caption(
    engines: dict[str, Engine], scenes: list[Scene]
) -> None:
    # The catalog's own sample prompt; it used to give an empty text.
    sample = scenes[:50]
    rows = [RowInput(i, b64(s), "What is in the picture? Answer: ") for i, s in enumerate(sample)]
    said = texts(engines["demo-vqa"].predict(rows))
    assert all(text.startswith("a ") for text in said), said
    assert report("demo-vqa open question", said, [s.caption for s in sample]) >= OPEN_TARGET


def test_conditional_caption_continues_the_prefix(
    engines: dict[str, Engine], scenes: list[Scene]
) -> None:
    # BLIP's conditional captioning: the prefix is part of the caption.
    sample = scenes[:50]
    rows = [RowInput(i, b64(s), "a " + s.objects[0].size) for i, s in enumerate(sample)]
    said = texts(engines["demo"].predict(rows))
    assert all(text.startswith(row.text or "") for text, row in zip(said, rows, strict=True))
    assert exact(said, [s.caption for s in sample]) >= CAPTION_TARGET["demo"]


def guard_rows(name: str, scenes: list[Scene]) -> list[RowInput]:
    rows = [RowInput(i, b64(s)) for i, s in enumerate(scenes)]
    if name == "demo-vqa":  # its answers too
        qas = [s.qa[i % len(s.qa)] for i, s in enumerate(scenes)]
        images = [row.image for row in rows]
        rows += [
            RowInput(len(images) + i, image, qa.prompt)
            for i, (image, qa) in enumerate(zip(images, qas, strict=True))
        ]
    return rows


# `auto` on a CPU: int8 (bfloat16 where torch has no int8 kernels), BLIP's vision encoder
# on OpenVINO in int8 where OpenVINO and NNCF are installed and the CPU has VNNI (--backend
# auto), BLIP-2's and otherwise on torch.
# With --backend openvino the vision encoder runs on OpenVINO (int8 with --dtype int8,
# float32 with --dtype float32, the exact mode, else bfloat16 where the CPU has it) beside
# the same decoder.  demo-vqa in bfloat16 says
# what float32 says for only ~96% of its captions and answers (its OPT decoder is sensitive
# to bf16 rounding), so it is not listed.
@pytest.mark.parametrize(
    ("name", "mode", "backend", "floor"),
    [
        ("demo", "auto", "openvino", SAME_AS_FLOAT32_OPENVINO),
        ("demo-vqa", "auto", "openvino", SAME_AS_FLOAT32_OPENVINO),
        ("demo", "float32", "openvino", SAME_AS_FLOAT32_OPENVINO),
        ("demo-vqa", "float32", "openvino", SAME_AS_FLOAT32_OPENVINO),
        ("demo", "bfloat16", "torch", SAME_AS_FLOAT32),
        ("demo", "bfloat16", "openvino", SAME_AS_FLOAT32_OPENVINO),
        ("demo", "int8", "torch", SAME_AS_FLOAT32),
        ("demo-vqa", "int8", "torch", SAME_AS_FLOAT32),
        ("demo", "int8", "openvino", SAME_AS_FLOAT32_OPENVINO),
        ("demo-vqa", "int8", "openvino", SAME_AS_FLOAT32_OPENVINO),
    ],
)
def test_speed_modes_say_what_float32_says(
    engines: dict[str, Engine],
    scenes: list[Scene],
    name: str,
    mode: str,
    backend: str,
    floor: float,
) -> None:
    if mode == "int8" and int8_linear.int8_available() is not None:
        pytest.skip(str(int8_linear.int8_available()))
    if backend == "openvino" and openvino_vision.unavailable(torch.device("cpu")):
        pytest.skip(str(openvino_vision.unavailable(torch.device("cpu"))))
    rows = guard_rows(name, scenes)
    reference = texts(engines[name].predict(rows))
    with load(name, mode, backend) as fast:
        said = texts(fast.predict(rows))
    rate = report(f"{name} {mode} ({backend}) vs float32", said, reference)
    assert rate >= floor


def blipserve(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``blipserve`` command, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "blipserve.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )


def test_main_job_captions_the_examples() -> None:
    """The README's main job: ``blipserve caption --model demo examples/*.png``."""
    images = sorted((ROOT / "examples").glob("*.png"))
    truth = {
        row["file_name"]: row["text"]
        for row in map(json.loads, (ROOT / "examples" / "metadata.jsonl").read_text().splitlines())
    }
    out = blipserve("caption", "--model", "demo", *map(str, images))
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    lines = out.stdout.splitlines()
    assert len(lines) == len(images)
    said = dict(line.split("\t", 1) for line in lines)  # "path<TAB>caption" per image
    right = sum(said[str(image)] == truth[image.name] for image in images)
    assert right >= len(images) - 1, out.stdout  # 8 examples; the model is ~95% right


def test_ask_demo_vqa_a_bare_question() -> None:
    """``blipserve ask`` wraps a bare question for BLIP-2, as the chat route does."""
    qa = json.loads((ROOT / "examples" / "questions.jsonl").read_text().splitlines()[0])
    out = blipserve(
        "ask", "--model", "demo-vqa", str(ROOT / "examples" / qa["file_name"]), qa["question"]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == qa["answer"]
