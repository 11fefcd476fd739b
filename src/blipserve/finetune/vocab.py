"""Small tokenizers for models trained from scratch on the synthetic scene grammar.

Both are WordPiece over the grammar's words plus single characters (``a``..``z`` and
``##a``..``##z``), so any lowercase text still tokenizes into pieces instead of ``[UNK]``;
the grammar's own words are single tokens, which keeps sequences short.

* BLIP: BERT-style (lowercase; ``[PAD] [UNK] [CLS] [SEP] [MASK]``) plus BLIP's ``[DEC]``
  beginning-of-caption token; saved as a ``BertTokenizer`` like the published BLIP ones.
* BLIP-2 / OPT: ``<pad>`` (1) and ``</s>`` (2, beginning and end of text, prepended to
  every text as OPT's tokenizer does) and the ``<image>`` placeholder that
  ``Blip2Processor`` repeats ``num_query_tokens`` times; saved as a
  ``PreTrainedTokenizerFast``.  Left padding, so batched prompts end where generation
  starts.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Any

from blipserve.finetune.scenes import vocabulary

BLIP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
IMAGE_TOKEN = "<image>"


def word_pieces(words: Iterable[str]) -> list[str]:
    """Grammar words, then characters and ``##`` continuations as a fallback for others."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = [*words, *chars, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    return list(dict.fromkeys(pieces))


def blip_tokenizer(words: Iterable[str] | None = None) -> Any:
    """A BERT tokenizer for BLIP over ``words`` (default: the scene grammar)."""
    from transformers import BertTokenizer

    tokens = [*BLIP_SPECIALS, *word_pieces(vocabulary() if words is None else words)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # BLIP's decoder starts every caption with [DEC] (config.text_config.bos_token_id).
    return BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=64)


def opt_tokenizer(words: Iterable[str] | None = None) -> Any:
    """An OPT-style tokenizer (``</s>`` prefix, ``<image>`` placeholder) over ``words``."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tokens = [*OPT_SPECIALS, *word_pieces(vocabulary() if words is None else words)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    # A special added token: never split or lowercased, dropped by skip_special_tokens.
    # (Registered here rather than as ``tokenizer.image_token``: Blip2Processor expects
    # that attribute to be an AddedToken and adds one itself when it is missing.)
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    # Like OPT: every text starts with </s>, which is also what generate() starts a caption
    # with when it is given no prompt (text_config.bos_token_id).
    backend.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=128,
    )
