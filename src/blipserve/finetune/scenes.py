"""Synthetic scenes: simple shapes with one true caption each, and questions about them.

They are the data of ``blipserve finetune --data synthetic`` (and ``--eval-data
synthetic``) and the word list of the tokenizers a new model gets; the built-in demo
models were trained on them and are measured on them.

A scene is a small RGB image with one to three objects (a circle, square or triangle in one
of five clearly distinct colours, small or large) on a plain, lightly noisy background.
Its caption names the objects **from left to right**, so exactly one caption describes an
image: ``a small red circle left of a large blue square``.  Objects never overlap, and
their horizontal extents are separated by a clear gap, so "left of" is never a judgement
call.  No two objects in a scene share both colour and shape, so every question asked
about a scene (colour, shape, size, count, existence, position) has one correct answer.

Everything is deterministic: scene ``i`` of seed ``s`` is the same image on every machine
(:func:`scene_at`), which lets training draw fresh scenes forever and resume mid-stream,
and keeps the held-out scenes (:data:`HELDOUT_SEED`) apart from the training ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Shape = Literal["circle", "square", "triangle"]
Size = Literal["small", "large"]

#: seed of the training stream (``--data synthetic``); the demo models were trained on it
TRAIN_SEED = 20240601
#: seed of the held-out scenes (``--eval-data synthetic``); no training run draws from it
HELDOUT_SEED = 77001

IMAGE_SIZE = 64
SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle")
SIZES: dict[Size, int] = {"small": 10, "large": 16}  # side of the bounding box, in pixels
# Saturated colours far apart in RGB, none of them close to a (neutral) background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 45, 195),
}
# Neutral greys from near-white to near-black; each scene tints its own slightly.
BACKGROUNDS: tuple[int, ...] = (245, 215, 180, 140, 100, 60, 25)
COLOR_JITTER = 12  # per channel, so a model cannot key on exact RGB values
BACKGROUND_JITTER = 8
NOISE_STD = 4.0  # light per-pixel Gaussian noise, in 0..255 units
MARGIN = 2  # pixels kept free at the image border
MIN_GAP = 4  # least horizontal gap between two objects, in pixels
SUPERSAMPLE = 4  # shapes are drawn this much larger, then reduced: smooth edges

NUMBERS = ("zero", "one", "two", "three")
CAPTION_JOIN = " left of "
QUESTION_KINDS = ("color", "shape", "size", "count", "count_shape", "exists", "position")


@dataclass(frozen=True)
class SceneObject:
    """One object; ``x``, ``y`` is the top-left corner of its square bounding box."""

    shape: Shape
    color: str
    size: Size
    x: int
    y: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        """``red circle``: colour and shape, unique within a scene."""
        return f"{self.color} {self.shape}"

    @property
    def phrase(self) -> str:
        """``a small red circle``: how the caption names it."""
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class QA:
    """A question about a scene and its one correct answer; ``kind`` is its type."""

    question: str
    answer: str
    kind: str

    @property
    def prompt(self) -> str:
        """The BLIP-2 prompt for the question: ``Question: ... Answer:``."""
        return question_prompt(self.question)


@dataclass(frozen=True)
class Scene:
    """An image, its one true caption and questions about it."""

    image: Image.Image
    objects: tuple[SceneObject, ...]  # left to right
    caption: str
    qa: tuple[QA, ...] = field(default=())


def question_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


# The forms clients send a question in: BLIP-2's own ``Question: q Answer:``, the
# catalog sample's ``q Answer: `` and the bare question.
PROMPT_FORMS: dict[str, str] = {
    "question": "Question: {q} Answer:",
    "answer": "{q} Answer: ",
    "bare": "{q}",
}
# Open questions, answered with the scene's caption.
OPEN_QUESTIONS = (
    "what is in the picture?",
    "what is in the image?",
    "what do you see?",
    "describe the picture.",
    "what does the image show?",
)


def prompt_in_form(question: str, form: str, rng: random.Random) -> str:
    """``question`` in prompt form ``form``, with the case and trailing spaces clients vary
    (``rng`` picks them: capitalised, lowercase or upper case; zero to two spaces)."""
    text = PROMPT_FORMS[form].format(q=question)
    case = rng.randrange(3)
    text = text[:1].upper() + text[1:] if case == 0 else text.upper() if case == 1 else text.lower()
    return text.rstrip() + " " * rng.randrange(3)


def random_prompt(question: str, rng: random.Random) -> tuple[str, str]:
    """A seeded random form of ``question``: (form name, prompt)."""
    form = rng.choice(list(PROMPT_FORMS))
    return form, prompt_in_form(question, form, rng)


def caption_of(objects: tuple[SceneObject, ...]) -> str:
    """The caption: every object's phrase, left to right, joined by ``left of``."""
    ordered = sorted(objects, key=lambda o: o.x)
    return CAPTION_JOIN.join(o.phrase for o in ordered)


def vocabulary() -> list[str]:
    """Every word the captions, questions and answers use (for building tokenizers)."""
    words: list[str] = ["a", "left", "of", "question", "answer", ":", "?"]
    words += list(SIZES) + list(COLORS) + list(SHAPES) + [f"{s}s" for s in SHAPES]
    words += [*NUMBERS, "yes", "no"]
    words += ["what", "color", "shape", "size", "is", "the", "object", "objects"]
    words += ["how", "many", "are", "there", "on", "right", "in", "middle"]
    return list(dict.fromkeys(words))


# --- layout -------------------------------------------------------------------------


def _layout(rng: random.Random) -> tuple[SceneObject, ...]:
    """One to three objects with distinct (colour, shape), placed left to right.

    Horizontal positions come from spreading the free width over the gaps around the
    objects, so every draw is valid (no rejection loop) and the gaps are >= ``MIN_GAP``.
    """
    count = rng.randint(1, 3)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.sample(pairs, count)
    sizes: list[Size] = [rng.choice(("small", "large")) for _ in chosen]
    widths = [SIZES[s] for s in sizes]
    slack = IMAGE_SIZE - 2 * MARGIN - sum(widths) - (count - 1) * MIN_GAP
    # Sorted cut points in [0, slack]: object i is shifted right by cuts[i] in total.
    cuts = sorted(rng.randint(0, slack) for _ in range(count))
    objects: list[SceneObject] = []
    left = MARGIN
    for i, ((color, shape), size, width) in enumerate(zip(chosen, sizes, widths, strict=True)):
        x = left + cuts[i]
        y = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - width)
        objects.append(SceneObject(shape=shape, color=color, size=size, x=x, y=y))
        left += width + MIN_GAP
    return tuple(objects)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)
    return (r, g, b)


def render(objects: tuple[SceneObject, ...], rng: random.Random) -> Image.Image:
    """Draw ``objects`` on a tinted neutral background with light noise (RGB, 64x64)."""
    grey = rng.choice(BACKGROUNDS)
    background = _jitter(rng, (grey, grey, grey), BACKGROUND_JITTER)
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = _jitter(rng, COLORS[obj.color], COLOR_JITTER)
        x0, y0 = obj.x * k, obj.y * k
        x1, y1 = (obj.x + obj.side) * k - 1, (obj.y + obj.side) * k - 1
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    image = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float64)  # (H, W, 3)
    noisy = pixels + noise_rng.normal(0.0, NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


# --- questions ----------------------------------------------------------------------


def all_questions(objects: tuple[SceneObject, ...]) -> list[QA]:
    """Every question the grammar can ask about ``objects`` that has exactly one answer."""
    ordered = sorted(objects, key=lambda o: o.x)
    qa: list[QA] = []
    for shape in SHAPES:
        same = [o for o in ordered if o.shape == shape]
        if len(same) == 1:  # with two circles, "the circle" would be ambiguous
            qa.append(QA(f"what color is the {shape}?", same[0].color, "color"))
    for color in COLORS:
        same = [o for o in ordered if o.color == color]
        if len(same) == 1:
            qa.append(QA(f"what shape is the {color} object?", same[0].shape, "shape"))
    for obj in ordered:
        qa.append(QA(f"what size is the {obj.name}?", obj.size, "size"))
    qa.append(QA("how many objects are there?", NUMBERS[len(ordered)], "count"))
    for shape in SHAPES:
        n = sum(o.shape == shape for o in ordered)
        qa.append(QA(f"how many {shape}s are there?", NUMBERS[n], "count_shape"))
    present = {o.name for o in ordered}
    for color in COLORS:
        for shape in SHAPES:
            name = f"{color} {shape}"
            qa.append(QA(f"is there a {name}?", "yes" if name in present else "no", "exists"))
    if len(ordered) >= 2:  # with one object, "on the left" has no answer
        qa.append(QA("what is on the left?", ordered[0].name, "position"))
        qa.append(QA("what is on the right?", ordered[-1].name, "position"))
    if len(ordered) == 3:
        qa.append(QA("what is in the middle?", ordered[1].name, "position"))
    return qa


def pick_questions(objects: tuple[SceneObject, ...], rng: random.Random) -> tuple[QA, ...]:
    """One question of each kind that applies; existence is yes or no with equal odds."""
    by_kind: dict[str, list[QA]] = {}
    for qa in all_questions(objects):
        by_kind.setdefault(qa.kind, []).append(qa)
    if "exists" in by_kind:
        # Most pairs are absent: choose the answer first so "yes" is not a rare event.
        answer = rng.choice(("yes", "no"))
        by_kind["exists"] = [qa for qa in by_kind["exists"] if qa.answer == answer]
    return tuple(rng.choice(by_kind[kind]) for kind in QUESTION_KINDS if by_kind.get(kind))


# --- scenes -------------------------------------------------------------------------


def make_scene(rng: random.Random) -> Scene:
    """A new random scene drawn from ``rng``."""
    objects = _layout(rng)
    image = render(objects, rng)
    return Scene(
        image=image,
        objects=objects,
        caption=caption_of(objects),
        qa=pick_questions(objects, rng),
    )


def scene_at(seed: int, index: int) -> Scene:
    """Scene number ``index`` of the stream ``seed``; independent of every other index."""
    # A string seed is hashed with SHA-512 by ``random``: stable across runs and machines.
    return make_scene(random.Random(f"blipserve-scenes/{seed}/{index}"))


def generate(seed: int, n: int | None = None, start: int = 0) -> Iterator[Scene]:
    """Scenes ``start``, ``start + 1``, ... of stream ``seed``; forever when ``n`` is None."""
    index = start
    while n is None or index < start + n:
        yield scene_at(seed, index)
        index += 1


def write_imagefolder(directory: str | Path, seed: int, n: int, *, questions: bool = True) -> Path:
    """Write ``n`` scenes as PNGs plus a Hugging Face imagefolder ``metadata.jsonl``.

    Each image has a caption row (``file_name``, ``text``, ``prompt`` null) and, with
    ``questions``, one row per question (``prompt`` = ``Question: ... Answer:``, ``text`` =
    the answer).  Loads with ``datasets.load_dataset("imagefolder", data_dir=directory)``
    and with :func:`blipserve.finetune.data.load_examples`.
    """
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str | None]] = []
    for i, scene in enumerate(generate(seed, n)):
        name = f"images/{i:06d}.png"
        scene.image.save(root / name)
        rows.append({"file_name": name, "text": scene.caption, "prompt": None})
        if questions:
            rows.extend(
                {"file_name": name, "text": qa.answer, "prompt": qa.prompt} for qa in scene.qa
            )
    with (root / "metadata.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return root


#: first held-out scene index of the committed examples (far from the 0..499 the model
#: cards are measured on, so the examples are not the evaluation set)
EXAMPLES_START = 10_000


def write_examples(directory: str | Path, n: int = 8) -> Path:
    """Write the repository's ``examples/``: held-out scenes with their true text.

    ``scene-01.png`` ... as PNGs, ``metadata.jsonl`` (imagefolder: ``file_name``, ``text`` =
    the true caption) and ``questions.jsonl`` (``file_name``, ``question``, ``answer``).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    captions: list[dict[str, str]] = []
    questions: list[dict[str, str]] = []
    for i, scene in enumerate(generate(HELDOUT_SEED, n, start=EXAMPLES_START), start=1):
        name = f"scene-{i:02d}.png"
        scene.image.save(root / name)
        captions.append({"file_name": name, "text": scene.caption})
        questions += [
            {"file_name": name, "question": qa.question, "answer": qa.answer} for qa in scene.qa
        ]
    for file, rows in (("metadata.jsonl", captions), ("questions.jsonl", questions)):
        with (root / file).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return root
