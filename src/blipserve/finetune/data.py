"""Training examples and where they come from.

An :class:`Example` is an image, an optional prompt and the target text.  Sources are
indexable and stateless (example ``i`` is always the same), so a resumed run sees exactly
the examples it would have seen without the interruption:

* :class:`RowSource`: rows of an imagefolder ``metadata.jsonl`` or a CSV (``file_name``,
  ``text``, optional ``prompt``), reshuffled every epoch;
* :class:`SceneSource`: an endless stream of fresh synthetic scenes (captions, and for
  BLIP-2 also questions).

:mod:`blipserve.finetune.collate` turns a list of them into a family's model inputs.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from blipserve.finetune import scenes


@dataclass(frozen=True)
class Example:
    """An image, an optional prompt (BLIP: caption prefix; BLIP-2: ``Question: .. Answer:``)
    and the text the model should produce after it."""

    image: Image.Image
    text: str
    prompt: str | None = None
    # Examples with the same key show the same image (BLIP-2 batches then encode it once).
    image_key: Hashable | None = None
    kind: str | None = None  # a synthetic question's kind (per-kind scores in evaluation)
    form: str | None = None  # its prompt form (scenes.PROMPT_FORMS, or "open")


class Source(Protocol):
    """Examples by index; ``size`` is None for an endless source."""

    size: int | None

    def example(self, index: int) -> Example: ...


@dataclass(frozen=True)
class Row:
    image_path: Path
    text: str
    prompt: str | None


class RowSource:
    """A finite list of rows, in a fresh random order every epoch (seeded)."""

    def __init__(self, rows: Sequence[Row], seed: int = 0, shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("the data set has no rows")
        self.rows = list(rows)
        self.size: int | None = len(self.rows)
        self.seed = seed
        self.shuffle = shuffle
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is ever needed
        return self._orders[epoch]

    def example(self, index: int) -> Example:
        epoch, offset = divmod(index, len(self.rows))
        row = self.rows[self._order(epoch)[offset]]
        with Image.open(row.image_path) as im:
            image = im.convert("RGB")
        return Example(image=image, text=row.text, prompt=row.prompt, image_key=row.image_path)


class SceneSource:
    """Synthetic scenes: example ``i`` is scene ``i`` of ``seed``, as a caption or a question.

    With ``caption_fraction`` < 1 a seeded coin decides per example whether it is the
    scene's caption or one of its questions (one per kind in ``scene.qa``, chosen with
    ``kind_weights``, 1 for kinds it does not name: uniformly by default).

    With ``questions_per_image`` = K > 0, examples come in groups of 1 + K per scene
    instead: its caption, then K of its questions of distinct kinds (fewer if the scene
    has fewer kinds; chosen with ``kind_weights``), all with the scene's ``image_key``.

    With ``prompt_forms``, each question comes in a seeded random prompt form
    (:data:`scenes.PROMPT_FORMS`, varied in case and trailing spaces) instead of
    ``QA.prompt``, and half the caption rows become an open question ("what is in the
    picture?" and paraphrases) in such a form, answered with the caption.
    """

    def __init__(
        self,
        seed: int,
        caption_fraction: float = 1.0,
        kind_weights: Mapping[str, float] | None = None,
        questions_per_image: int = 0,
        prompt_forms: bool = False,
    ) -> None:
        self.seed = seed
        self.prompt_forms = prompt_forms
        self.caption_fraction = caption_fraction
        self.kind_weights = dict(kind_weights or {})
        self.questions_per_image = questions_per_image
        self.size: int | None = None
        # A group's rows share one render and one choice of questions.
        self._last: tuple[int, scenes.Scene, list[scenes.QA]] | None = None

    def example(self, index: int) -> Example:
        if self.questions_per_image:
            return self._grouped(*divmod(index, 1 + self.questions_per_image))
        scene = scenes.scene_at(self.seed, index)
        rng = random.Random(f"task/{self.seed}/{index}")
        if not scene.qa or rng.random() < self.caption_fraction:
            return self._caption(scene, f"{index}")
        if self.kind_weights:
            weights = [self._weight(q) for q in scene.qa]
            qa = rng.choices(scene.qa, weights)[0] if sum(weights) > 0 else rng.choice(scene.qa)
        else:
            qa = rng.choice(scene.qa)  # (as before weights existed: same streams)
        return Example(image=scene.image, text=qa.answer, prompt=self._prompt(qa, f"{index}"))

    def _prompt(self, qa: scenes.QA, where: str) -> str:
        if not self.prompt_forms:
            return qa.prompt
        return scenes.random_prompt(qa.question, random.Random(f"form/{self.seed}/{where}"))[1]

    def _caption(self, scene: scenes.Scene, where: str, key: Hashable | None = None) -> Example:
        """The caption, unprompted or (with ``prompt_forms``, half the time) asked for."""
        rng = random.Random(f"open/{self.seed}/{where}")
        if self.prompt_forms and rng.random() < 0.5:
            prompt = scenes.random_prompt(rng.choice(scenes.OPEN_QUESTIONS), rng)[1]
            return Example(image=scene.image, text=scene.caption, prompt=prompt, image_key=key)
        return Example(image=scene.image, text=scene.caption, image_key=key)

    def _weight(self, qa: scenes.QA) -> float:
        return self.kind_weights.get(qa.kind, 1.0)

    def _grouped(self, index: int, slot: int) -> Example:
        if self._last is None or self._last[0] != index:
            scene = scenes.scene_at(self.seed, index)
            rng = random.Random(f"questions/{self.seed}/{index}")
            self._last = (index, scene, self._questions(scene.qa, rng))
        _, scene, chosen = self._last
        key = ("scene", self.seed, index)
        if slot == 0 or slot > len(chosen):  # (a scene with fewer kinds: its caption again)
            return self._caption(scene, f"{index}/{slot}", key)
        qa = chosen[slot - 1]
        prompt = self._prompt(qa, f"{index}/{slot}")
        return Example(image=scene.image, text=qa.answer, prompt=prompt, image_key=key)

    def _questions(self, qa: Sequence[scenes.QA], rng: random.Random) -> list[scenes.QA]:
        """``questions_per_image`` of ``qa`` without repeats, weighted by kind."""
        pool = [q for q in qa if self._weight(q) > 0] or list(qa)
        chosen: list[scenes.QA] = []
        while pool and len(chosen) < self.questions_per_image:
            weights = [self._weight(q) for q in pool]
            pick = rng.choices(range(len(pool)), weights)[0] if sum(weights) > 0 else 0
            chosen.append(pool.pop(pick))
        return chosen


def read_rows(path: str | Path) -> list[Row]:
    """Rows of a folder's ``metadata.jsonl`` (or ``metadata.csv``), or of a CSV file.

    ``file_name`` is relative to the folder holding the metadata file; ``prompt`` is
    optional and empty / null means "no prompt".
    """
    path = Path(path)
    if path.is_dir():
        if (path / "metadata.jsonl").is_file():
            meta = path / "metadata.jsonl"
        elif (path / "metadata.csv").is_file():
            meta = path / "metadata.csv"
        else:
            raise ValueError(f"{path}: no metadata.jsonl or metadata.csv in this folder")
    elif path.is_file():
        meta = path
    else:
        raise ValueError(f"{path}: no such folder or file")
    if meta.suffix == ".jsonl":
        with meta.open(encoding="utf-8") as f:
            records = [(n, json.loads(line)) for n, line in enumerate(f, start=1) if line.strip()]
    elif meta.suffix == ".csv":
        with meta.open(encoding="utf-8", newline="") as f:
            records = list(enumerate(csv.DictReader(f), start=2))
    else:
        raise ValueError(f"{meta}: expected a .jsonl or .csv metadata file")
    rows = []
    for line, record in records:
        if not isinstance(record, dict) or not record.get("file_name") or "text" not in record:
            raise ValueError(f"{meta}:{line}: a row needs 'file_name' and 'text'")
        image_path = meta.parent / str(record["file_name"])
        if not image_path.is_file():
            raise ValueError(f"{meta}:{line}: image {image_path} does not exist")
        prompt = record.get("prompt") or None
        rows.append(Row(image_path, str(record["text"]), None if prompt is None else str(prompt)))
    return rows


# --- collation ----------------------------------------------------------------------


def make_source(
    data: str,
    *,
    family: str,
    seed: int,
    caption_fraction: float,
    kind_weights: Mapping[str, float] | None = None,
    questions_per_image: int = 0,
    prompt_forms: bool = False,
) -> Source:
    """The training source named by ``FinetuneConfig.data``."""
    if data == "synthetic":
        fraction = 1.0 if family == "blip" else caption_fraction
        # seed 0 is the scene stream TRAIN_SEED; another seed, another fresh stream (e.g. a
        # second training stage that should not replay the first one's scenes).
        return SceneSource(
            scenes.TRAIN_SEED + seed,
            caption_fraction=fraction,
            kind_weights=kind_weights,
            questions_per_image=0 if family == "blip" else questions_per_image,
            prompt_forms=prompt_forms and family != "blip",
        )
    return RowSource(read_rows(data), seed=seed)
