"""Generate with a model the standard way and score it: exact match and BLEU-4.

Predictions go through the processor and ``model.generate`` exactly as a user would call
them (``processor(images=..., text=...)``), so a score measured here is the score of the
saved folder, not of some training-time shortcut.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from blipserve.finetune import scenes
from blipserve.finetune.build import Bundle, load_bundle
from blipserve.finetune.data import Example, RowSource, read_rows
from blipserve.finetune.metrics import corpus_bleu, exact_match


def heldout_examples(n: int, family: str, *, every_question: bool = False) -> list[Example]:
    """Examples from ``n`` held-out scenes: every caption, and for BLIP-2 questions too.

    Questions: one per scene (seeded) for quick periodic checks, or with
    ``every_question`` all of ``scene.qa`` (one of each kind that applies).
    """
    examples: list[Example] = []
    for i, scene in enumerate(scenes.generate(scenes.HELDOUT_SEED, n)):
        examples.append(Example(scene.image, scene.caption))
        if family == "blip" or not scene.qa:
            continue
        qas = scene.qa if every_question else [random.Random(f"eval/{i}").choice(scene.qa)]
        examples.extend(Example(scene.image, qa.answer, qa.prompt, kind=qa.kind) for qa in qas)
    return examples


def form_examples(n: int) -> list[Example]:
    """Prompts as clients send them, from ``n`` held-out scenes: every question of each
    scene in each of :data:`scenes.PROMPT_FORMS` (seeded case and trailing spaces), and one
    open question per scene (a seeded paraphrase and form) whose answer is the caption."""
    examples: list[Example] = []
    for i, scene in enumerate(scenes.generate(scenes.HELDOUT_SEED, n)):
        for form in scenes.PROMPT_FORMS:
            for j, qa in enumerate(scene.qa):
                prompt = scenes.prompt_in_form(qa.question, form, random.Random(f"{form}/{i}/{j}"))
                examples.append(Example(scene.image, qa.answer, prompt, form=form))
        rng = random.Random(f"open/{i}")
        prompt = scenes.random_prompt(rng.choice(scenes.OPEN_QUESTIONS), rng)[1]
        examples.append(Example(scene.image, scene.caption, prompt, form="open"))
    return examples


def eval_examples(data: str, n: int, family: str) -> list[Example]:
    """The evaluation set named by ``FinetuneConfig.eval_data`` (first ``n`` examples)."""
    if not data:
        return []
    if data == "synthetic":
        return heldout_examples(n, family)
    source = RowSource(read_rows(data), shuffle=False)
    size = source.size or 0
    return [source.example(i) for i in range(min(n, size))]


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    # Decoder-only generation continues from the last column: prompts must end there.
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


@torch.no_grad()
def predict(
    bundle: Bundle, examples: Sequence[Example], *, batch_size: int = 64, max_new_tokens: int = 32
) -> list[str]:
    """Greedy generations for ``examples`` (BLIP captions include their prompt prefix)."""
    model, processor = bundle.model, bundle.processor
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(examples)
    # BLIP's generate drops the last prompt column ([SEP]), so padded rows cannot share a
    # batch: group BLIP rows by prompt length.  BLIP-2 pads on the left and masks it.
    # Captions and prompted rows go in separate batches too: short answers then stop after
    # a few tokens instead of waiting for the longest caption in their batch.
    groups: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        key = -1 if ex.prompt is None else 0
        if bundle.family == "blip" and ex.prompt is not None:
            key = len(processor.tokenizer(ex.prompt)["input_ids"])
        groups.setdefault(key, []).append(i)
    try:
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                texts = _generate(bundle, [examples[i] for i in chunk], device, max_new_tokens)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
    finally:
        model.train(was_training)
    return out


def _generate(
    bundle: Bundle, batch: Sequence[Example], device: torch.device, max_new_tokens: int
) -> list[str]:
    processor = bundle.processor
    images = [ex.image for ex in batch]
    has_prompt = any(ex.prompt is not None for ex in batch)
    if bundle.family == "blip2":
        # An empty prompt tokenizes to bos alone: the same start as a plain caption.
        with _left_padding(processor.tokenizer):
            inputs = processor(
                images=images,
                text=[ex.prompt or "" for ex in batch],
                padding=True,
                return_tensors="pt",
            )
    elif has_prompt:
        inputs = processor(
            images=images, text=[ex.prompt or "" for ex in batch], return_tensors="pt"
        )
    else:
        inputs = processor(images=images, return_tensors="pt")
    # (BERT tokenizers add token_type_ids, which generate does not take)
    inputs = {k: v.to(device) for k, v in inputs.items() if k != "token_type_ids"}
    ids = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens)
    if bundle.decoder_only:
        ids = ids[:, inputs["input_ids"].shape[1] :]  # (B, new): drop the echoed prompt
    texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def score(
    bundle: Bundle, examples: Sequence[Example], *, batch_size: int = 64, max_new_tokens: int = 32
) -> dict[str, float]:
    """Exact match and BLEU-4, overall and separately for captions and for answers."""
    preds = predict(bundle, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    refs = [_reference(bundle, ex) for ex in examples]
    result: dict[str, float] = {
        "n": float(len(examples)),
        "exact": exact_match(preds, refs),
        "bleu4": corpus_bleu(preds, refs),
    }
    for name, want_prompt in (("caption", False), ("answer", True)):
        idx = [i for i, ex in enumerate(examples) if (ex.prompt is not None) == want_prompt]
        if idx and len(idx) < len(examples):
            p, r = [preds[i] for i in idx], [refs[i] for i in idx]
            result[f"{name}_n"] = float(len(idx))
            result[f"{name}_exact"] = exact_match(p, r)
            result[f"{name}_bleu4"] = corpus_bleu(p, r)
    # Synthetic questions also by kind ("answer_exact/exists"): where a recipe falls short.
    kinds = sorted({ex.kind for ex in examples if ex.kind is not None})
    for kind in kinds:
        idx = [i for i, ex in enumerate(examples) if ex.kind == kind]
        said, truth = [preds[i] for i in idx], [refs[i] for i in idx]
        result[f"answer_exact/{kind}"] = exact_match(said, truth)
    return result


def score_forms(
    bundle: Bundle, examples: Sequence[Example], *, batch_size: int = 64
) -> dict[str, float]:
    """Exact match per prompt form (``answer_exact/form:bare``; open questions:
    ``open_exact``), with the number of examples of each (``answer_n/form:bare``)."""
    preds = predict(bundle, examples, batch_size=batch_size)
    result: dict[str, float] = {}
    for form in dict.fromkeys(ex.form for ex in examples if ex.form is not None):
        idx = [i for i, ex in enumerate(examples) if ex.form == form]
        exact = exact_match([preds[i] for i in idx], [examples[i].text for i in idx])
        n_key, exact_key = (
            ("open_n", "open_exact")
            if form == "open"
            else (f"answer_n/form:{form}", f"answer_exact/form:{form}")
        )
        result[n_key], result[exact_key] = float(len(idx)), exact
    return result


def _reference(bundle: Bundle, ex: Example) -> str:
    # A BLIP caption continues its prompt and includes it; BLIP-2 answers after it.
    if bundle.family == "blip" and ex.prompt is not None:
        return f"{ex.prompt} {ex.text}"
    return ex.text


def evaluate_folder(model_dir: str, scenes_n: int = 500, batch_size: int = 64) -> dict[str, float]:
    """Load a saved folder and score it on ``scenes_n`` fresh held-out scenes.

    Every caption, and for BLIP-2 every question of each scene (one per kind that
    applies) as ``QA.prompt``, then again in each prompt form clients send, with open
    questions (:func:`form_examples`, :func:`score_forms`).  This is the measurement
    reported in the demo model cards.
    """
    bundle = load_bundle(model_dir)
    examples = heldout_examples(scenes_n, bundle.family, every_question=True)
    result = score(bundle, examples, batch_size=batch_size)
    if bundle.family == "blip2":
        result.update(score_forms(bundle, form_examples(scenes_n), batch_size=batch_size))
    return result
