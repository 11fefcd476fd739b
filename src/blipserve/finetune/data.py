"""Training examples and how they become model inputs.

An :class:`Example` is an image, an optional prompt and the target text.  Sources are
indexable and stateless (example ``i`` is always the same), so a resumed run sees exactly
the examples it would have seen without the interruption:

* :class:`RowSource`: rows of an imagefolder ``metadata.jsonl`` or a CSV (``file_name``,
  ``text``, optional ``prompt``), reshuffled every epoch;
* :class:`SceneSource`: an endless stream of fresh synthetic scenes (captions, and for
  BLIP-2 also questions).

:func:`collate` turns a list of examples into the tensors a family's ``forward`` takes,
with ``labels`` = -100 wherever no loss belongs (prompt, image placeholders, padding).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from blipserve.finetune import scenes
from blipserve.finetune.build import Bundle

IGNORE = -100  # label value CrossEntropyLoss skips


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


def collate(bundle: Bundle, batch: Sequence[Example], pack: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs with ``labels`` for a batch of examples.

    For BLIP-2, rows with the same ``image_key`` share one image: ``pixel_values`` then
    holds each distinct image once.  With an OPT-style (decoder-only) language model and
    ``pack``, an image's rows become one sequence (see :func:`_blip2_packed`); otherwise
    ``image_index`` (B,) says which image is each row's.
    """
    images, index = [ex.image for ex in batch], None
    if bundle.family == "blip2":
        images, index = _distinct_images(batch)
    pixels = bundle.processor.image_processor(images=images, return_tensors="pt")[
        "pixel_values"
    ]  # (images, 3, S, S)
    shared = {} if index is None else {"image_index": index}
    if bundle.family == "blip":
        text = _blip_text(bundle, batch)
    elif bundle.decoder_only and index is not None and pack:
        text, shared = _blip2_packed(bundle, batch, index), {}
    elif bundle.decoder_only:
        text = _blip2_decoder_only(bundle, batch)
    else:
        text = _blip2_seq2seq(bundle, batch)
    return {"pixel_values": pixels, **text, **shared}


def _distinct_images(batch: Sequence[Example]) -> tuple[list[Image.Image], torch.Tensor | None]:
    """Each keyed image once, and every row's position among them (None: no sharing)."""
    images: list[Image.Image] = []
    slots: dict[Hashable, int] = {}
    index = []
    for ex in batch:
        key = ex.image_key if ex.image_key is not None else ("row", id(ex))
        if key not in slots:
            slots[key] = len(images)
            images.append(ex.image)
        index.append(slots[key])
    if len(images) == len(batch):
        return images, None
    return images, torch.tensor(index, dtype=torch.long)  # (B,)


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out  # (B, T), right-padded


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _blip_text(bundle: Bundle, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
    """``[DEC] prompt text [SEP]``; loss on ``text [SEP]`` (as BLIP fine-tunes on COCO).

    BERT tokenization gives ``[CLS] ... [SEP]``; BLIP's decoder replaces ``[CLS]`` with its
    beginning-of-caption token, as ``generate`` does.
    """
    tokenizer = bundle.processor.tokenizer
    bos = bundle.model.config.text_config.bos_token_id
    pad = tokenizer.pad_token_id
    ids, labels = [], []
    for ex in batch:
        full = ex.text if ex.prompt is None else f"{ex.prompt} {ex.text}"
        row = _ids(tokenizer, full)
        row[0] = bos
        # The prompt's tokens without its [SEP] are the prefix the caption continues.
        prefix = 1 if ex.prompt is None else len(_ids(tokenizer, ex.prompt)) - 1
        ids.append(row)
        labels.append([IGNORE] * prefix + row[prefix:])
    input_ids = _pad(ids, pad)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad).long(),  # (B, T); pad never occurs in text
        "labels": _pad(labels, IGNORE),  # (B, T)
    }


def _blip2_decoder_only(bundle: Bundle, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
    """``<image> * Q, bos, prompt, text, eos``; loss only on ``text, eos``.

    This is exactly what the processor builds for a prompt (or, with no prompt, what
    ``generate`` starts from: image tokens and bos), followed by the target.  The prompt
    is tokenized on its own and as part of prompt + text; the shared prefix is masked.
    """
    config = bundle.model.config
    tokenizer = bundle.processor.tokenizer
    image = [config.image_token_index] * config.num_query_tokens
    eos = config.text_config.eos_token_id
    ids, labels, mask = [], [], []
    for ex in batch:
        prompt = _ids(tokenizer, ex.prompt or "")
        full = [*_ids(tokenizer, f"{ex.prompt} {ex.text}" if ex.prompt else ex.text), eos]
        if full[: len(prompt)] != prompt:
            # (a BPE merge across the prompt/answer boundary; tokenize the parts apart)
            full = prompt + _ids(tokenizer, " " + ex.text, special=False) + [eos]
        ids.append(image + full)
        labels.append([IGNORE] * (len(image) + len(prompt)) + full[len(prompt) :])
        mask.append([1] * (len(image) + len(full)))
    return {
        "input_ids": _pad(ids, tokenizer.pad_token_id),  # (B, Q + T)
        "attention_mask": _pad(mask, 0),  # (B, Q + T)
        "labels": _pad(labels, IGNORE),  # (B, Q + T); forward aligns and shifts
    }


def _blip2_packed(
    bundle: Bundle, batch: Sequence[Example], index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One language-model sequence per image: ``<image> * Q`` and then each of its rows.

    Every row ``bos, prompt, text, eos`` sees the image tokens and itself only (a 4D
    block-causal mask) and takes the positions it would have on its own (Q, Q + 1, ...),
    so each row's logits, and the batch's loss, are those of separate rows; but the image
    tokens go through the language model once per image instead of once per row, and no
    short question is padded to the caption's length.  (4 rows per image: about half the
    language model's tokens.)  The mask is additive float, which transformers passes
    unchanged to the eager and SDPA attention paths.
    """
    config = bundle.model.config
    tokenizer = bundle.processor.tokenizer
    q = config.num_query_tokens
    rows = _blip2_decoder_only(bundle, batch)  # (B, Q + T) each, right-padded
    lengths = [int(n) for n in rows["attention_mask"].sum(dim=1)]
    groups: list[list[int]] = [[] for _ in range(int(index.max()) + 1)]
    for row, image in enumerate(index.tolist()):
        groups[image].append(row)
    width = max(q + sum(lengths[r] - q for r in group) for group in groups)
    ids = torch.full((len(groups), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), -1, dtype=torch.long)  # -1: padding
    for image, group in enumerate(groups):
        ids[image, :q] = rows["input_ids"][group[0], :q]  # the image placeholders
        positions[image, :q] = torch.arange(q)
        segment[image, :q] = 0  # the image tokens, seen by every row
        at = q
        for n, row in enumerate(group, start=1):
            end = at + lengths[row] - q
            ids[image, at:end] = rows["input_ids"][row, q : lengths[row]]
            labels[image, at:end] = rows["labels"][row, q : lengths[row]]
            positions[image, at:end] = torch.arange(q, lengths[row])
            segment[image, at:end] = n
            at = end
    # allowed[s, i, j]: token i may attend to token j (causal, own row or image tokens)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # (S, L, L)
    image_key = (segment == 0)[:, None, :]  # (S, 1, L)
    allowed = causal & (same | image_key)
    dtype = bundle.model.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {
        "input_ids": ids,  # (S, L)
        "attention_mask": mask[:, None],  # (S, 1, L, L), 0 or the dtype's minimum
        "position_ids": positions,  # (S, L)
        "labels": labels,  # (S, L)
    }


def _blip2_seq2seq(bundle: Bundle, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Flan-T5 BLIP-2: the encoder reads ``<image> * Q, prompt``; the decoder writes text."""
    config = bundle.model.config
    tokenizer = bundle.processor.tokenizer
    image = [config.image_token_index] * config.num_query_tokens
    ids = [image + _ids(tokenizer, ex.prompt or "") for ex in batch]
    targets = [_ids(tokenizer, ex.text) for ex in batch]  # T5 appends </s> itself
    return {
        "input_ids": _pad(ids, tokenizer.pad_token_id),  # (B, Q + P)
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),  # (B, Q + P)
        "labels": _pad(targets, IGNORE),  # (B, T)
    }


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
