"""Build a new small BLIP / BLIP-2 model from a config, or load one to fine-tune.

A new model gets a tokenizer over the scene grammar (:mod:`blipserve.finetune.vocab`) and
an image processor at its own resolution, so that ``save_pretrained`` writes a folder that
``AutoProcessor`` and ``Blip*ForConditionalGeneration.from_pretrained`` load like any
published checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from blipserve.finetune.config import INIT_BLIP, INIT_BLIP2, FamilyName, FinetuneConfig
from blipserve.finetune.vocab import IMAGE_TOKEN, blip_tokenizer, opt_tokenizer


@dataclass
class Bundle:
    """A model, its processor and which family it belongs to."""

    model: Any
    processor: Any
    family: FamilyName

    @property
    def decoder_only(self) -> bool:
        return self.family == "blip2" and bool(self.model.config.use_decoder_only_language_model)


def _image_processor(cfg: FinetuneConfig) -> Any:
    from transformers import BlipImageProcessorPil

    # The PIL backend: the default one needs torchvision, which blipserve does not require.
    return BlipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})


def _vision(cfg: FinetuneConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.num_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "attention_dropout": 0.0,
    }


# The library default (max_length 20, counting the prompt and BLIP-2's query tokens) would
# cut long captions.  BLIP and BLIP-2 call ``generate`` on their text model, whose generation
# config is built from ``text_config``: the limit goes there as well as on the outer model.
MAX_NEW_TOKENS = 40


def _generation_defaults(model: Any, eos: int, pad: int, bos: int) -> None:
    gen = model.generation_config
    gen.max_length = None
    gen.max_new_tokens = MAX_NEW_TOKENS
    gen.num_beams = 1
    gen.do_sample = False
    gen.eos_token_id = eos
    gen.pad_token_id = pad
    gen.bos_token_id = bos


def new_blip(cfg: FinetuneConfig) -> Bundle:
    """A BLIP captioner (ViT + BERT-style decoder with cross-attention) from scratch."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tokenizer = blip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "bos_token_id": tokenizer.bos_token_id,  # [DEC]
        "eos_token_id": tokenizer.sep_token_id,  # captions end with [SEP]
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    config = BlipConfig(
        text_config=text,
        vision_config=_vision(cfg),
        projection_dim=cfg.hidden_size,
        image_text_hidden_size=cfg.hidden_size,
    )
    config.architectures = ["BlipForConditionalGeneration"]
    torch.manual_seed(cfg.seed)
    model = BlipForConditionalGeneration(config)
    _generation_defaults(
        model, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    )
    processor = BlipProcessor(image_processor=_image_processor(cfg), tokenizer=tokenizer)
    return Bundle(model, processor, "blip")


def new_blip2(cfg: FinetuneConfig) -> Bundle:
    """A BLIP-2 model (ViT + Q-Former + small OPT) from scratch."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    tokenizer = opt_tokenizer()
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        ffn_dim=4 * cfg.hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.num_heads,
        word_embed_proj_dim=cfg.hidden_size,
        max_position_embeddings=cfg.num_query_tokens + 64,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    qformer = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.qformer_layers,
        "num_attention_heads": cfg.num_heads,
        "encoder_hidden_size": cfg.hidden_size,
        "cross_attention_frequency": 1,  # every layer looks at the image
        "max_position_embeddings": 64,
        "vocab_size": len(tokenizer),  # (unused by generation; keep the table small)
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    config = Blip2Config(
        vision_config=_vision(cfg),
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=cfg.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_text_hidden_size=cfg.hidden_size,
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    torch.manual_seed(cfg.seed)
    model = Blip2ForConditionalGeneration(config)
    _generation_defaults(
        model, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    )
    processor = Blip2Processor(
        image_processor=_image_processor(cfg),
        tokenizer=tokenizer,
        num_query_tokens=cfg.num_query_tokens,
    )
    return Bundle(model, processor, "blip2")


def load_bundle(source: str) -> Bundle:
    """Load a ``save_pretrained`` folder (or hub id) of a BLIP or BLIP-2 captioner."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(source)
    if config.model_type == "blip":
        family: FamilyName = "blip"
        model = BlipForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    elif config.model_type == "blip-2":
        family = "blip2"
        model = Blip2ForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    else:
        raise ValueError(
            f"{source}: model_type {config.model_type!r} cannot be fine-tuned here; "
            "expected a BLIP ('blip') or BLIP-2 ('blip-2') captioning model"
        )
    processor = AutoProcessor.from_pretrained(source)
    if family == "blip2" and getattr(processor, "num_query_tokens", None) is None:
        # Old checkpoints lack it; the processor must know how many <image> tokens to insert.
        processor.num_query_tokens = model.config.num_query_tokens
    return Bundle(model, processor, family)


def make_bundle(cfg: FinetuneConfig) -> Bundle:
    if cfg.init in (INIT_BLIP, INIT_BLIP2):
        bundle = new_blip(cfg) if cfg.init == INIT_BLIP else new_blip2(cfg)
        if cfg.vision_init:
            copy_vision(load_bundle(cfg.vision_init).model, bundle.model, cfg.vision_init)
        if cfg.qformer_init:
            if bundle.family != "blip2":
                raise ValueError("qformer_init applies to new BLIP-2 models ('config:blip2')")
            source = load_bundle(cfg.qformer_init)
            if source.family != "blip":
                raise ValueError(f"qformer_init {cfg.qformer_init}: not a BLIP captioning model")
            copy_qformer(source.model, bundle.model, cfg.qformer_init)
        return bundle
    if cfg.init.startswith("config:"):
        raise ValueError(f"init {cfg.init!r}: expected {INIT_BLIP!r}, {INIT_BLIP2!r} or a folder")
    if cfg.vision_init or cfg.qformer_init:
        raise ValueError("vision_init and qformer_init apply to new models ('config:...') only")
    return load_bundle(cfg.init)


def _load_matching(module: Any, weights: dict[str, Any], mismatch: str) -> None:
    """Load ``weights`` into ``module``, which must find each of its tensors there in the
    same shape; else ``ValueError(mismatch + where)``."""
    own = module.state_dict()
    wrong = sorted(k for k in own if k not in weights or weights[k].shape != own[k].shape)
    if wrong:
        raise ValueError(f"{mismatch}; differs at {wrong[0]}")
    module.load_state_dict({k: weights[k] for k in own})


def copy_vision(source: Any, target: Any, name: str) -> None:
    """Load ``source``'s ViT into ``target``'s (BLIP and BLIP-2 vision towers have the same
    parameter names and shapes in transformers, so either can feed either)."""
    _load_matching(
        target.vision_model,
        source.vision_model.state_dict(),
        f"vision_init {name}: its image encoder does not match the new model's "
        "(image size, patch size, width and layers must be equal)",
    )


# BLIP text-decoder layer -> BLIP-2 Q-Former layer parameter names.  Both are BERT layers
# with cross-attention; the Q-Former's query tokens take the feed-forward "_query" branch.
_QFORMER_NAMES = (
    ("attention.self.", "attention.attention."),
    ("crossattention.self.", "crossattention.attention."),
    ("intermediate.", "intermediate_query."),
    ("output.dense", "output_query.dense"),
    ("output.LayerNorm", "output_query.LayerNorm"),
)


def _qformer_name(name: str) -> str:
    for old, new in _QFORMER_NAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name  # attention.output.*, crossattention.output.*: the same names


def copy_qformer(source: Any, target: Any, name: str) -> None:
    """Initialise ``target``'s Q-Former layers from BLIP ``source``'s text decoder layers.

    The decoder's layers learnt to pick out of the image encoder's output what a caption
    needs; the Q-Former's learnable queries start from that instead of from noise (BLIP-2
    starts its Q-Former from BERT for the same reason).  Its embedding LayerNorm initialises
    the one the Q-Former applies to the queries.
    """
    layers = source.text_decoder.bert.encoder.layer
    qformer = target.qformer
    wanted = len(qformer.encoder.layer)
    if len(layers) < wanted:
        raise ValueError(
            f"qformer_init {name}: its text decoder has {len(layers)} layers, fewer than the "
            f"Q-Former's {wanted}"
        )
    for i, layer in enumerate(qformer.encoder.layer):
        _load_matching(
            layer,
            {_qformer_name(k): v for k, v in layers[i].state_dict().items()},
            f"qformer_init {name}: its text decoder's layer {i} does not fit the Q-Former "
            "(width, heads and cross-attention width must be equal)",
        )
    norm = source.text_decoder.bert.embeddings.LayerNorm.state_dict()
    qformer.layernorm.load_state_dict(norm)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
