"""The core types every layer shares: a row as it arrives, as the model sees it, and what
the model said about it.

Entry points make :class:`RowInput` rows (from a catalog request, an OpenAI message, a
file); the engine turns each into a :class:`ModelInput` (image decoded, text checked) and
the adapter answers with a :class:`Prediction`.  :data:`Outcome` is one row's end: its
prediction, its own error, or its batch's model failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from blipserve.errors import InferenceError, RowError
from blipserve.params import GenerationParams


@dataclass(frozen=True)
class RowInput:
    """One row of a request, before its image is decoded.

    ``image`` is an http(s) URL or base64 text (a local path only where the entry point
    allows paths: the CLI, never HTTP), or the bytes of an image file (batch jobs read
    files themselves, from a disk or an object store).  ``index`` is the row's label from the
    request's ``index`` (its position when there is none).
    """

    position: int
    image: str | bytes
    text: str | None = None
    index: object | None = None


#: where a streamed row's text goes as it is decoded: called on the model thread with the
#: index of the row's text (0 .. num_return_sequences - 1) and the next piece of that text
TextSink = Callable[[int, str], None]


@dataclass(frozen=True)
class ModelInput:
    """A decoded row: an RGB image, the row's text (if any) and its generation settings.

    ``on_text`` (a streamed row's): receives the text in pieces as the model decodes it;
    not part of the row's identity (batch keys, equality).
    """

    image: Image.Image
    text: str | None
    params: GenerationParams
    on_text: TextSink | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Prediction:
    """What the model said about one row: the text, and a probability for matching.

    When a row asked for several texts (``num_return_sequences`` above 1), ``texts`` holds
    them all, best first, and ``text`` is the first; otherwise ``texts`` is None and the
    answer is what it always was.
    """

    text: str
    score: float | None = None
    #: generated tokens (not part of the catalog's answer; the OpenAI route reports it)
    tokens: int | None = None
    #: every text asked for, best first (``texts[0] == text``); None when one was asked for
    texts: tuple[str, ...] | None = None
    #: the generated tokens of each of ``texts``
    texts_tokens: tuple[int, ...] | None = None

    @classmethod
    def best_first(cls, sequences: Sequence[Prediction]) -> Prediction:
        """One row's prediction from its texts, ordered best first."""
        best = sequences[0]
        return cls(
            best.text,
            tokens=best.tokens,
            texts=tuple(s.text for s in sequences),
            texts_tokens=tuple(s.tokens or 0 for s in sequences),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.score is not None:
            out["score"] = self.score
        if self.texts is not None:
            out["texts"] = list(self.texts)
        return out


#: what one row became: its prediction, its own error, or its batch's model failure
Outcome = Prediction | RowError | InferenceError
