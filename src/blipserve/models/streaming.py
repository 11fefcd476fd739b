"""Texts as ``generate`` decodes them, row by row of a batch.

transformers' ``generate(streamer=...)`` hands the streamer the prompt first (decoder-only
models; an encoder-decoder's decoder start token), a (B * k, T) tensor for B rows of k texts
each, and then one token per sequence at each step, a (B * k,) tensor.  The prompt is part
of the answer only where the model's text continues it (BLIP's caption prefix).  Its own
``TextStreamer`` takes one sequence only; :class:`RowStreamer` splits each step by
sequence and gives each row's sink (:data:`~blipserve.types.TextSink`) the new text of each
of its texts.

Each sequence is decoded whole after every step (as ``TextStreamer`` does) and only the part
that later tokens cannot change is sent: the text up to the whitespace before its last word,
since the last word may be incomplete (a word split over tokens, a character's UTF-8 bytes
split over byte-level tokens) and the space before it may vanish (decoding cleans up
``" ."`` into ``"."``).  Leading whitespace is never sent and trailing whitespace only when
more text follows, so the pieces add up to the answer's text, which is stripped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from blipserve.types import TextSink

log = logging.getLogger(__name__)

#: the whitespace before the last word of a text (the word may be empty)
_LAST_WORD = re.compile(r"\s+\S*$")


class RowStreamer:
    """A ``generate`` streamer for a batch: each row's texts to that row's sink.

    ``sinks``: one per row of the batch (``None``: a row that does not stream); ``per_row``:
    the texts each row generates, side by side as ``generate`` lays them out;
    ``prompt_in_text``: whether the answer's text starts with the prompt's.
    """

    def __init__(
        self,
        tokenizer: Any,
        sinks: Sequence[TextSink | None],
        per_row: int,
        *,
        prompt_in_text: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.sinks = list(sinks)
        self.per_row = per_row
        self.prompt_in_text = prompt_in_text
        self.tokens: list[list[int]] = [[] for _ in range(len(self.sinks) * per_row)]
        self.sent = [""] * len(self.tokens)  # what each sequence's sink has had
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """A step's tokens: (N,), or (N, S) for several steps at once; the first call is
        the prompt (N, T), kept only when the answer's text starts with it."""
        if not self.prompt_seen:
            self.prompt_seen = True
            if self.prompt_in_text:
                for seq, prompt in enumerate(value.tolist()[: len(self.tokens)]):
                    self.tokens[seq].extend(prompt)
            return
        steps = value.view(value.shape[0], -1).tolist()  # (N, S)
        for seq, new in enumerate(steps[: len(self.tokens)]):  # (rows padded for graphs: none)
            if self.sinks[seq // self.per_row] is None:
                continue
            self.tokens[seq].extend(new)
            text = self.text(seq)
            self.send(seq, text[: _stable_end(text)])

    def end(self) -> None:
        """Generation ended: send every sequence's rest."""
        for seq in range(len(self.tokens)):
            if self.sinks[seq // self.per_row] is not None:
                self.send(seq, self.text(seq).rstrip())

    def text(self, seq: int) -> str:
        decoded: str = self.tokenizer.decode(self.tokens[seq], skip_special_tokens=True)
        return decoded.lstrip()

    def send(self, seq: int, stable: str) -> None:
        sent = self.sent[seq]
        if len(stable) <= len(sent):
            return
        if not stable.startswith(sent):
            # Decoding changed text already sent (not seen with BLIP's or OPT's tokenizers);
            # the caller's final text is the answer, the pieces stop here.
            log.debug("streamed text of sequence %d diverged; holding the rest", seq)
            return
        self.sent[seq] = stable
        sink = self.sinks[seq // self.per_row]
        if sink is not None:
            sink(seq % self.per_row, stable[len(sent) :])


def _stable_end(text: str) -> int:
    """Where the part of a text being generated that later tokens cannot change ends."""
    last = _LAST_WORD.search(text)
    end = last.start() if last else 0  # a text of one word: all of it may still change
    bad = text.find("\ufffd", 0, end)  # an incomplete UTF-8 character
    return end if bad < 0 else bad
