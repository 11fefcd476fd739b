"""Synthetic scenes: deterministic, one true caption, questions with one correct answer."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipserve.finetune import scenes
from blipserve.finetune.scenes import QA, SceneObject


def _pixels(image: Image.Image) -> bytes:
    return image.tobytes()


def _layouts(n: int) -> list[scenes.Scene]:
    return list(scenes.generate(scenes.TRAIN_SEED, n))


def test_same_seed_same_scenes() -> None:
    a = list(scenes.generate(123, 5))
    b = list(scenes.generate(123, 5))
    for x, y in zip(a, b, strict=True):
        assert _pixels(x.image) == _pixels(y.image)
        assert (x.caption, x.qa, x.objects) == (y.caption, y.qa, y.objects)


def test_scene_at_matches_generate_and_is_independent_of_order() -> None:
    stream = list(scenes.generate(7, 4, start=10))
    assert _pixels(stream[2].image) == _pixels(scenes.scene_at(7, 12).image)
    assert stream[2].caption == scenes.scene_at(7, 12).caption


def test_make_scene_is_deterministic_in_its_rng() -> None:
    a = scenes.make_scene(random.Random(5))
    b = scenes.make_scene(random.Random(5))
    assert _pixels(a.image) == _pixels(b.image)
    assert a.caption == b.caption


def test_train_and_heldout_seeds_differ() -> None:
    assert scenes.TRAIN_SEED != scenes.HELDOUT_SEED
    train = {_pixels(s.image) for s in scenes.generate(scenes.TRAIN_SEED, 30)}
    heldout = {_pixels(s.image) for s in scenes.generate(scenes.HELDOUT_SEED, 30)}
    assert not train & heldout


def test_images_are_small_rgb() -> None:
    scene = scenes.scene_at(0, 0)
    assert scene.image.mode == "RGB"
    assert scene.image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_layouts_are_unambiguous() -> None:
    for scene in _layouts(300):
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert len({o.name for o in objs}) == len(objs)  # no two share colour and shape
        assert [o.x for o in objs] == sorted(o.x for o in objs)  # stored left to right
        for o in objs:
            assert o.x >= scenes.MARGIN
            assert o.x + o.side <= scenes.IMAGE_SIZE - scenes.MARGIN
            assert o.y >= scenes.MARGIN
            assert o.y + o.side <= scenes.IMAGE_SIZE - scenes.MARGIN
        for left, right in itertools.pairwise(objs):
            # Horizontal extents apart by a clear gap: "left of" is never a close call.
            assert right.x - (left.x + left.side) >= scenes.MIN_GAP


def test_every_object_count_shape_colour_and_size_occurs() -> None:
    seen = _layouts(300)
    assert {len(s.objects) for s in seen} == {1, 2, 3}
    objects = [o for s in seen for o in s.objects]
    assert {o.shape for o in objects} == set(scenes.SHAPES)
    assert {o.color for o in objects} == set(scenes.COLORS)
    assert {o.size for o in objects} == set(scenes.SIZES)


def _nearest_color(rgb: np.ndarray) -> str:
    return min(scenes.COLORS, key=lambda c: float(np.sum((np.array(scenes.COLORS[c]) - rgb) ** 2)))


def test_image_shows_the_objects_the_caption_names() -> None:
    for scene in _layouts(100):
        pixels = np.asarray(scene.image, dtype=np.float32)  # (H, W, 3)
        for o in scene.objects:
            # The middle of the bounding box (lower for a triangle) lies inside the shape.
            cy = o.y + (o.side * 2) // 3 if o.shape == "triangle" else o.y + o.side // 2
            cx = o.x + o.side // 2
            patch = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)
            assert _nearest_color(patch) == o.color


def test_caption_names_objects_left_to_right_in_one_wording() -> None:
    a = SceneObject("circle", "red", "small", x=40, y=5)
    b = SceneObject("square", "blue", "large", x=2, y=30)
    c = SceneObject("triangle", "green", "small", x=22, y=10)
    want = "a large blue square left of a small green triangle left of a small red circle"
    for order in ((a, b, c), (c, b, a), (b, a, c)):
        assert scenes.caption_of(order) == want
    assert scenes.caption_of((a,)) == "a small red circle"


def test_captions_are_determined_by_the_layout() -> None:
    by_caption: dict[str, set[tuple[tuple[str, str, str], ...]]] = {}
    for scene in _layouts(300):
        content = tuple((o.size, o.color, o.shape) for o in scene.objects)  # left to right
        by_caption.setdefault(scene.caption, set()).add(content)
        assert scene.caption == scenes.caption_of(scene.objects)
    # One caption, one left-to-right sequence of objects (and vice versa).
    assert all(len(contents) == 1 for contents in by_caption.values())


def _answers(objects: tuple[SceneObject, ...]) -> dict[str, str]:
    qa = scenes.all_questions(objects)
    questions = [q.question for q in qa]
    assert len(questions) == len(set(questions)), "a question asked twice"
    return {q.question: q.answer for q in qa}


def test_answers_for_a_constructed_scene() -> None:
    objects = (
        SceneObject("square", "blue", "large", x=2, y=30),
        SceneObject("circle", "red", "small", x=24, y=5),
        SceneObject("circle", "blue", "small", x=44, y=20),
    )
    answers = _answers(objects)
    assert answers["how many objects are there?"] == "three"
    assert answers["how many circles are there?"] == "two"
    assert answers["how many triangles are there?"] == "zero"
    assert answers["what color is the square?"] == "blue"
    assert "what color is the circle?" not in answers  # two circles: no single answer
    assert answers["what shape is the red object?"] == "circle"
    assert "what shape is the blue object?" not in answers  # blue square and blue circle
    assert answers["what size is the blue square?"] == "large"
    assert answers["what size is the red circle?"] == "small"
    assert answers["is there a red circle?"] == "yes"
    assert answers["is there a red square?"] == "no"
    assert answers["what is on the left?"] == "blue square"
    assert answers["what is in the middle?"] == "red circle"
    assert answers["what is on the right?"] == "blue circle"


def test_one_object_has_no_left_or_right() -> None:
    answers = _answers((SceneObject("triangle", "yellow", "large", x=20, y=20),))
    assert "what is on the left?" not in answers
    assert "what is in the middle?" not in answers
    assert answers["how many objects are there?"] == "one"
    assert answers["what color is the triangle?"] == "yellow"


def test_scene_questions_are_correct_and_balanced() -> None:
    kinds: dict[str, int] = {}
    exists = {"yes": 0, "no": 0}
    for scene in _layouts(200):
        truth = _answers(scene.objects)
        for qa in scene.qa:
            assert truth[qa.question] == qa.answer
            assert qa.prompt == f"Question: {qa.question} Answer:"
            kinds[qa.kind] = kinds.get(qa.kind, 0) + 1
            if qa.kind == "exists":
                exists[qa.answer] += 1
    assert set(kinds) == set(scenes.QUESTION_KINDS)
    assert min(exists.values()) > 60  # "yes" is not a rare answer


def test_vocabulary_covers_every_text() -> None:
    words = set(scenes.vocabulary())
    for scene in _layouts(200):
        texts = [scene.caption] + [f"{qa.question} {qa.answer}" for qa in scene.qa]
        for text in texts:
            assert set(text.replace("?", " ? ").split()) <= words


def test_write_imagefolder(tmp_path: Path) -> None:
    root = scenes.write_imagefolder(tmp_path / "set", seed=3, n=4)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    expected = list(scenes.generate(3, 4))
    captions = [r for r in rows if r["prompt"] is None]
    assert [r["text"] for r in captions] == [s.caption for s in expected]
    questions = [r for r in rows if r["prompt"] is not None]
    assert len(questions) == sum(len(s.qa) for s in expected)
    for row in questions:
        assert row["prompt"].startswith("Question: ")
        assert row["prompt"].endswith(" Answer:")
    for row, scene in zip(captions, expected, strict=True):
        with Image.open(root / row["file_name"]) as im:
            assert im.mode == "RGB"
            assert im.tobytes() == scene.image.tobytes()  # PNG is lossless


def test_write_imagefolder_captions_only(tmp_path: Path) -> None:
    root = scenes.write_imagefolder(tmp_path, seed=3, n=2, questions=False)
    rows = (root / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert len(list((root / "images").glob("*.png"))) == 2


@pytest.mark.parametrize("question", ["what color is the circle?", "how many objects are there?"])
def test_qa_prompt(question: str) -> None:
    assert QA(question, "x", "color").prompt == f"Question: {question} Answer:"


def test_prompt_forms() -> None:
    question = "what color is the circle?"
    seen: dict[str, set[str]] = {}
    for seed in range(60):
        for form in scenes.PROMPT_FORMS:
            prompt = scenes.prompt_in_form(question, form, random.Random(seed))
            seen.setdefault(form, set()).add(prompt)
            # Case and trailing spaces vary; the words are the form's.
            assert " ".join(prompt.lower().split()) == " ".join(
                scenes.PROMPT_FORMS[form].format(q=question).lower().split()
            )
    assert "Question: what color is the circle? Answer:" in seen["question"]
    assert "What color is the circle? Answer: " in seen["answer"]
    assert question in seen["bare"]
    assert any(p.isupper() for p in seen["bare"])
    assert any(p.endswith("  ") for p in seen["bare"])
    # Seeded: the same rng state gives the same form and prompt.
    assert scenes.random_prompt(question, random.Random(1)) == scenes.random_prompt(
        question, random.Random(1)
    )
    assert {scenes.random_prompt(question, random.Random(s))[0] for s in range(30)} == set(
        scenes.PROMPT_FORMS
    )
