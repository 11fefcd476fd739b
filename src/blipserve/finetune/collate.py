"""Training examples as the tensors a family's ``forward`` takes: :func:`collate`, with
``labels`` = -100 (:data:`IGNORE`) wherever no loss belongs (prompt, image placeholders,
padding)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from PIL import Image

from blipserve.finetune.build import Bundle
from blipserve.finetune.data import Example

IGNORE = -100  # label value CrossEntropyLoss skips


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
