"""Tiny random-weight models in folders shaped exactly like the real checkpoints.

Each folder starts as a copy of a published checkpoint's non-weight files (tests/data/
hf-layouts: real tokenizer, processor settings and config), with the network shrunk to a
few layers of width 32 and 32 px images, and random weights saved by ``save_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
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


BUILDERS: dict[str, Callable[[Path], None]] = {
    "blip-caption": _blip(BlipForConditionalGeneration, "blip-image-captioning-base"),
    "blip-vqa": _blip(BlipForQuestionAnswering, "blip-vqa-base"),
    "blip-itm": _blip(BlipForImageTextRetrieval, "blip-itm-base-coco"),
    "blip2-opt": _blip2(decoder_only=True),
    "blip2-t5": _blip2(decoder_only=False),
}


def build(kind: str, dest: Path) -> Path:
    BUILDERS[kind](dest)
    return dest
