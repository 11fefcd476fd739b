"""Tiny random-weight models in folders shaped exactly like the real checkpoints.

Each folder starts as a copy of a published checkpoint's non-weight files (tests/data/
hf-layouts: real tokenizer, processor settings and config), with the network shrunk to a
few layers of width 32 and 32 px images, and random weights saved by ``save_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    PreTrainedTokenizerBase,
    T5Tokenizer,
)

LAYOUTS = Path(__file__).parent / "data" / "hf-layouts"
IMAGE_SIZE = 32
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
# initializer_range as in the published configs: BlipVisionConfig's own default (1e-10)
# would make the image encoder a near no-op, and every image look the same to the model.
VISION = {**SMALL, "image_size": IMAGE_SIZE, "patch_size": 8, "initializer_range": 0.02}


def _copy_layout(layout: str, dest: Path) -> None:
    shutil.copytree(LAYOUTS / layout, dest, dirs_exist_ok=True)


def _shrink_processor(dest: Path, **extra: Any) -> None:
    processor = AutoProcessor.from_pretrained(dest)
    processor.image_processor.size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    for key, value in extra.items():
        setattr(processor, key, value)
    processor.save_pretrained(dest)


def _blip(model_cls: Any, layout: str) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        _copy_layout(layout, dest)
        real = json.loads((dest / "config.json").read_text())
        text = {
            k: real["text_config"][k]
            for k in ("bos_token_id", "sep_token_id", "pad_token_id", "eos_token_id", "vocab_size")
            if k in real["text_config"]
        }
        config = BlipConfig(
            text_config={**text, **SMALL, "max_position_embeddings": 128},
            vision_config=VISION,
            projection_dim=32,
            image_text_hidden_size=32,
        )
        config.architectures = [model_cls.__name__]
        torch.manual_seed(0)
        model_cls(config).eval().save_pretrained(dest)
        _shrink_processor(dest)

    return build


def _blip2(decoder_only: bool) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        _copy_layout("blip2-opt-2.7b", dest)
        real = json.loads((dest / "config.json").read_text())
        vocab = real["text_config"]["vocab_size"]
        if decoder_only:
            text: dict[str, Any] = {
                "model_type": "opt",
                "vocab_size": vocab,
                "hidden_size": 32,
                "ffn_dim": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "word_embed_proj_dim": 32,
                "max_position_embeddings": 128,
                "bos_token_id": 2,
                "eos_token_id": 50118,
                "pad_token_id": 1,
            }
        else:
            # No T5 layout is published to us; the OPT tokenizer stands in (what matters
            # here is the encoder-decoder path: right padding, no prompt echo).
            text = {
                "model_type": "t5",
                "vocab_size": vocab,
                "d_model": 32,
                "d_ff": 64,
                "d_kv": 16,
                "num_layers": 2,
                "num_decoder_layers": 2,
                "num_heads": 2,
                "decoder_start_token_id": 1,
                "pad_token_id": 1,
                "eos_token_id": 2,
            }
        config = Blip2Config(
            vision_config=VISION,
            qformer_config={**SMALL, "encoder_hidden_size": 32, "max_position_embeddings": 64},
            text_config=text,
            num_query_tokens=4,
            image_token_index=real["image_token_index"],
            image_text_hidden_size=32,
        )
        config.architectures = ["Blip2ForConditionalGeneration"]
        torch.manual_seed(0)
        Blip2ForConditionalGeneration(config).eval().save_pretrained(dest)
        _shrink_processor(dest, num_query_tokens=4)

    return build


def _t5_tokenizer() -> PreTrainedTokenizerBase:
    """A T5 tokenizer made offline, shaped as Flan-T5's (a Unigram model: ``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended, 100 sentinels at the end).  Its pieces are
    BERT's vocabulary (``word`` -> ``▁word``, ``##piece`` -> ``piece``) and capital
    letters: no SentencePiece model of T5's is published to us."""
    pieces: dict[str, float] = {}
    vocab_txt = LAYOUTS / "blip-image-captioning-base" / "vocab.txt"
    for line in vocab_txt.read_text().splitlines():
        if line and not line.startswith("["):
            piece = line[2:] if line.startswith("##") else "▁" + line
            pieces.setdefault(piece, -10.0 if len(piece.lstrip("▁")) == 1 else -8.0)
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        pieces.update({letter: -10.0, "▁" + letter: -10.0})
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return T5Tokenizer(vocab=[*specials, *pieces.items(), *sentinels], extra_ids=100)


def _instructblip(decoder_only: bool) -> Callable[[Path], None]:
    """InstructBLIP, whose folder no one publishes to us: every file is what
    ``save_pretrained`` writes.  Vicuna's language model is LLaMA, tokenized here by BLIP-2
    OPT's GPT-2 tokenizer (LLaMA's is not published to us; both are decoder-only, and the
    padding traps are the same); Flan-T5's is T5 with :func:`_t5_tokenizer`.  The Q-Former
    reads the instruction through BLIP's BERT tokenizer, as the real ones do
    (bert-base-uncased)."""

    def build(dest: Path) -> None:
        images = BlipImageProcessor.from_pretrained(LAYOUTS / "blip2-opt-2.7b")
        images.size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        tokenizer = (
            AutoTokenizer.from_pretrained(LAYOUTS / "blip2-opt-2.7b")
            if decoder_only
            else _t5_tokenizer()
        )
        qformer_tokenizer = AutoTokenizer.from_pretrained(LAYOUTS / "blip-image-captioning-base")
        # The processor adds the <image> token to a tokenizer that lacks it (T5's).
        processor = InstructBlipProcessor(images, tokenizer, qformer_tokenizer, num_query_tokens=4)
        if decoder_only:
            text: dict[str, Any] = {
                "model_type": "llama",
                "vocab_size": len(tokenizer),
                **SMALL,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
        else:
            text = {
                "model_type": "t5",
                "vocab_size": len(tokenizer),
                "d_model": 32,
                "d_ff": 64,
                "d_kv": 16,
                "num_layers": 2,
                "num_decoder_layers": 2,
                "num_heads": 2,
                "feed_forward_proj": "gated-gelu",  # Flan-T5's (T5 v1.1)
                "tie_word_embeddings": False,
                "decoder_start_token_id": tokenizer.pad_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            }
        config = InstructBlipConfig(
            vision_config=VISION,
            qformer_config={
                **SMALL,
                "vocab_size": len(qformer_tokenizer),
                "max_position_embeddings": 64,
            },
            text_config=text,
            num_query_tokens=4,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
        config.architectures = ["InstructBlipForConditionalGeneration"]
        torch.manual_seed(0)
        InstructBlipForConditionalGeneration(config).eval().save_pretrained(dest)
        processor.save_pretrained(dest)

    return build


def _blip2_itm(dest: Path) -> None:
    """BLIP-2's image-text matching (blip2-itm-vit-g's shape: ViT, Q-Former with its text
    feed-forward layers, ITM head, no language model), whose folder no one publishes to
    us: every file is what ``save_pretrained`` writes.  The Q-Former reads the text
    through BLIP's BERT tokenizer plus ``<image>``, as the real one does (BertTokenizer,
    vocabulary 30523)."""
    images = BlipImageProcessor.from_pretrained(LAYOUTS / "blip2-opt-2.7b")
    images.size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    tokenizer = AutoTokenizer.from_pretrained(LAYOUTS / "blip-itm-base-coco")
    processor = Blip2Processor(images, tokenizer)  # (adds <image> to the tokenizer)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config={
            **SMALL,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "use_qformer_text_input": True,  # (the text's own feed-forward layers)
        },
        num_query_tokens=4,
        # as blip2-itm-vit-g's config now has it: the model drops Blip2Processor's
        # <image> tokens before the text itself
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_text_hidden_size=32,
    )
    config.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(config).eval().save_pretrained(dest)
    processor.save_pretrained(dest)


#: built by the tests that use them (``build``), not with every session's tiny_model_dir
BLIP2_ITM_BUILDERS: dict[str, Callable[[Path], None]] = {"blip2-itm": _blip2_itm}


#: built by the tests that use them (``build``), not with every session's tiny_model_dir
INSTRUCTBLIP_BUILDERS: dict[str, Callable[[Path], None]] = {
    "instructblip-vicuna": _instructblip(decoder_only=True),
    "instructblip-t5": _instructblip(decoder_only=False),
}

BUILDERS: dict[str, Callable[[Path], None]] = {
    "blip-caption": _blip(BlipForConditionalGeneration, "blip-image-captioning-base"),
    "blip-vqa": _blip(BlipForQuestionAnswering, "blip-vqa-base"),
    "blip-itm": _blip(BlipForImageTextRetrieval, "blip-itm-base-coco"),
    "blip2-opt": _blip2(decoder_only=True),
    "blip2-t5": _blip2(decoder_only=False),
}


def build(kind: str, dest: Path) -> Path:
    (BUILDERS | INSTRUCTBLIP_BUILDERS | BLIP2_ITM_BUILDERS)[kind](dest)
    return dest


class LazyModels(Mapping[str, Path]):
    """kind -> folder of its tiny model under ``root``, built on first use: a test run that
    needs only the BLIP captioner builds only that one (the fast tier saves seconds each)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def __getitem__(self, kind: str) -> Path:
        if kind not in BUILDERS:
            raise KeyError(kind)
        if kind not in self.built:
            self.built[kind] = build(kind, self.root / kind)
        return self.built[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(BUILDERS)

    def __len__(self) -> int:
        return len(BUILDERS)
