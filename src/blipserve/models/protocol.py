"""What the engine needs from a model family: the :class:`Adapter` protocol.

Everything outside :mod:`blipserve.models` holds an adapter by this protocol; the adapters
of transformers' model families share their code in :class:`~blipserve.models.base.HFAdapter`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import ClassVar, Literal, Protocol

import torch

from blipserve.models.optimize import BuildStep
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction

TextRole = Literal["prefix", "question", "match", "prompt"]


class Adapter(Protocol):
    """What the engine needs from a model family."""

    #: short name for messages and metrics, e.g. ``"blip-caption"``
    kind: ClassVar[str]
    #: what the row's ``text`` means to this model
    text_role: ClassVar[TextRole]
    #: whether a row without text is refused (VQA needs a question, ITM a caption)
    text_required: ClassVar[bool]
    #: side length the model's processor resizes images to (for draft decoding)
    image_size: int
    device: torch.device
    dtype: torch.dtype
    #: where the model was loaded from (folder or hub id)
    source: str
    #: who runs the vision encoder: ``torch`` or ``openvino`` (which uses every core per call)
    vision_backend: str
    #: decodes with a static KV cache (``--cuda-graphs``): batches padded to set sizes
    static_cache: bool
    #: the steps that built the model, in order (:func:`~blipserve.models.build_model`)
    build: tuple[BuildStep, ...]

    def check_row(self, item: ModelInput) -> None:
        """Raise :class:`~blipserve.errors.InvalidInput` naming what this model cannot take
        in the row (a text too long, no room left to generate, parameters it cannot
        honour): the row's 400, before it joins a batch it would fail."""
        ...

    def batch_key(self, item: ModelInput) -> Hashable:
        """Rows with equal keys may share one ``predict`` call with identical results (of
        rows :meth:`check_row` passed)."""
        ...

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        """Run one batch (already grouped by ``batch_key``); one prediction per item."""
        ...

    def check_params(self, params: GenerationParams) -> None:
        """Raise :class:`~blipserve.errors.InvalidInput` for parameters this model cannot
        honour whatever the row (several texts from a model that decodes greedily by
        default): what :class:`GenerationParams` cannot tell without the model."""
        ...

    def count_tokens(self, text: str | None) -> int: ...

    def question_prompt(self, question: str) -> str:
        """A bare question as this family takes questions (``blipserve ask``)."""
        ...

    def chat_prompt(self, question: str | None, history: Sequence[tuple[str, str]]) -> str | None:
        """The text for a chat's last ``question`` after its (question, answer) ``history``
        (``None``: a plain caption)."""
        ...

    @property
    def default_max_new_tokens(self) -> int: ...
