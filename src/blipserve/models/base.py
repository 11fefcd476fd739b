"""What the adapters of transformers' BLIP families share (:class:`HFAdapter`).

An adapter (:class:`~blipserve.models.protocol.Adapter`, cf. LitServe's ``LitAPI``) says
what it does with a row's text, which rows it refuses (``check_row``), how rows may be
grouped into one batch, and turns a batch of decoded rows into predictions.  The sequence
of a generating ``predict`` is written once here; a family supplies its rows as the model
reads them (``model_row``), its ``generate`` inputs (``model_inputs``), its static cache
arguments, its prompts and which speed options its model gets (``speedups``).  Building
a model: :mod:`blipserve.models.build`; device and dtype policy:
:mod:`blipserve.models.precision`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from blipserve.errors import InvalidInput, ModelLoadError
from blipserve.models import optimize
from blipserve.models.openvino_vision import OpenVinoVision
from blipserve.models.optimize import BuildStep, Speedup
from blipserve.models.pixels import DevicePixels, image_side
from blipserve.models.precision import Precision, amx_bf16
from blipserve.models.protocol import TextRole
from blipserve.models.static_cache import padded_rows
from blipserve.models.streaming import RowStreamer
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction


class HFAdapter:
    """Shared base: a transformers model + its processor on one device and dtype."""

    model_class: ClassVar[Any]
    kind: ClassVar[str]
    text_role: ClassVar[TextRole]
    text_required: ClassVar[bool] = False
    #: the int8 recipe for this family's vision encoder on OpenVINO (``int8-static`` or
    #: ``int8-dynamic``: :mod:`blipserve.models.openvino_vision`), the fastest whose demo
    #: model keeps the guard (captions and answers as float32's for at least 99% of
    #: held-out scenes).  BLIP: static int8, demo 99.5%; BLIP-base's ViT 113 / 106 ms per
    #: image at batch 1 / 8, dynamic int8 184 / 174, torch's int8 187 / 187
    #: (bench/results/openvino-encoder-2.json)
    vision_int8: ClassVar[str] = "int8-static"
    #: whether ``--backend auto`` puts an int8 model's encoder on OpenVINO: where that
    #: recipe measured faster than torch's int8 encoder
    openvino_when_auto: ClassVar[bool] = True
    #: whether ``--vision-attention`` applies (BLIP's vision encoder; BLIP-2's has SDPA)
    vision_attentions: ClassVar[bool] = False

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: torch.device,
        precision: Precision,
        *,
        source: str = "",
        static_cache: bool = False,
        device_pixels: DevicePixels | None = None,
        build: tuple[BuildStep, ...] = (),
    ):
        """Made once by :func:`~blipserve.models.build_model`, which applies the build's
        steps to ``model`` first; nothing changes it afterwards."""
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.precision = precision
        self.dtype = precision.dtype  # of the pixel values (and the model's float weights)
        self.image_size = image_side(processor)
        self.static_cache = static_cache
        self.device_pixels = device_pixels  # (None: the image processor, on the CPU)
        self.build = build
        self.source = source or str(getattr(model, "name_or_path", "") or self.kind)
        vision = getattr(model, "vision_model", None)
        self.vision_backend = "openvino" if isinstance(vision, OpenVinoVision) else "torch"

    def with_static_cache(self, on: bool = True) -> Self:
        """This adapter's model decoding with (or without) a static KV cache: a second
        adapter sharing the model (tests and benchmarks compare the two on a CPU, where
        ``--cuda-graphs`` is refused)."""
        why = self.static_cache_refusal(self.model.config) if on else None
        if why:
            raise ModelLoadError(f"a static KV cache: model {self.source!r}: {why}")
        return type(self)(
            self.model,
            self.processor,
            self.device,
            self.precision,
            source=self.source,
            static_cache=on,
            device_pixels=self.device_pixels,
            build=self.build,
        )

    @classmethod
    def static_cache_refusal(cls, config: Any) -> str | None:
        """Why a model of this family (its ``config``) cannot decode with a static KV cache
        (``--cuda-graphs``); None: it can."""
        return (
            f"{cls.kind} does not support it; it applies to BLIP captioning models and "
            "BLIP-2 / InstructBLIP models whose language model is decoder-only (OPT, Vicuna)"
        )

    @classmethod
    def speedups(
        cls, precision: Precision, device: torch.device, attention: str = "auto"
    ) -> list[Speedup]:
        """The speed options this family's model gets in ``precision`` on ``device``, in the
        order :func:`~blipserve.models.optimize.prepare` applies them (``attention``: how
        the vision encoder computes attention, where :attr:`vision_attentions` says the
        family has a choice).

        By default what helps any model: the allocator's setting on a CPU, and in int8 every
        Linear layer (the vision encoder's one image per call; on CPUs with AMX the vision
        encoder in bfloat16 instead).
        """
        steps = [optimize.KEEP_FREED_MEMORY] if device.type == "cpu" else []
        if precision.int8:
            steps += optimize.int8_layers(precision, amx=amx_bf16(device))
        return steps

    @classmethod
    def question_prompt(cls, question: str) -> str:
        """A bare question as this family takes questions; by default as it is."""
        return question

    @classmethod
    def chat_prompt(cls, question: str | None, history: Sequence[tuple[str, str]]) -> str | None:
        """The text for a chat's last ``question`` after its (question, answer) ``history``;
        ``None`` (no question) asks for a plain caption.

        By default single-turn, as BLIP's captioning, VQA and matching heads are: the
        question alone (a caption prefix, a question or the text to match).
        """
        return question

    def check_row(self, item: ModelInput) -> None:
        self.check_params(item.params)

    def batch_key(self, item: ModelInput) -> Hashable:
        raise NotImplementedError

    def count_tokens(self, text: str | None) -> int:
        """Tokens the language model sees for ``text`` (usage reporting)."""
        return len(self.tokenizer(text)["input_ids"]) if text else 0

    @property
    def default_max_new_tokens(self) -> int:
        """What ``generate`` uses when a request sets no limit (transformers' is 20)."""
        config = self.model.generation_config
        return int(config.max_new_tokens or 20)

    #: the generated text starts with the row's text (BLIP's caption prefix): a stream
    #: sends it with the first token after it
    echoes_prompt: ClassVar[bool] = False

    def model_row(self, item: ModelInput) -> ModelInput:
        """``item`` as the model reads it (a family may fill in a default prompt)."""
        return item

    def model_inputs(self, items: Sequence[ModelInput]) -> GenerateInputs:
        """The family's ``generate`` inputs for a batch of rows (pixels and prompt)."""
        raise NotImplementedError

    def static_cache_inputs(
        self, inputs: GenerateInputs, params: GenerationParams
    ) -> dict[str, Any]:
        """``generate``'s arguments for a static KV cache over ``inputs`` (``--cuda-graphs``;
        only families whose :meth:`static_cache_refusal` is None are asked)."""
        raise NotImplementedError

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        """One batch through ``generate``, in the order every generating family needs: the
        rows as the model reads them; their streams (before padding, which no client
        reads); the static cache's padding rows (``--cuda-graphs``: a few batch sizes,
        each compiled once); the family's inputs; generation; the padding rows' texts
        dropped; the prompt cut off and the rest decoded, ``k`` texts a row."""
        items = [self.model_row(item) for item in items]
        n, k, params = len(items), texts_per_row(items), items[0].params
        streaming = self.streaming(items, prompt_in_text=self.echoes_prompt)
        if self.static_cache:
            items = padded_rows(items)  # (the copies' texts dropped below)
        inputs = self.model_inputs(items)
        cache = self.static_cache_inputs(inputs, params) if self.static_cache else {}
        out = self.generate(params, **inputs.tensors, **streaming, **cache)
        out = out[: n * k, inputs.prompt_columns :]  # (n * k, L - prompt columns)
        return self.decode(out, new_from=inputs.new_from, per_row=k)

    def position_limit(self) -> int | None:
        """Positions the generating model's learned position embeddings cover (None: any)."""
        return None

    def check_room(self, prompt_positions: int, params: GenerationParams) -> None:
        """Refuse a row whose prompt and the tokens it may generate do not fit the model.

        Past its learned position embeddings ``generate`` fails with an index error, which
        would fail the whole batch; checked per row, it is the row's 400 instead.
        """
        limit = self.position_limit()
        if limit is None:
            return
        new = params.max_new_tokens or self.default_max_new_tokens
        # The last generated token is never fed back through the model: it needs no position.
        if prompt_positions + new - 1 <= limit:
            return
        room = limit - prompt_positions + 1
        if room < 1:
            raise InvalidInput(
                f"'text' is too long: with it this model ({limit} positions) has no room "
                "left to generate"
            )
        which = "max_new_tokens" if params.max_new_tokens else "the model's default max_new_tokens"
        raise InvalidInput(
            f"{which} is {new}, but this model ({limit} positions) has room for at most "
            f"{room} new tokens after this row's text; lower max_new_tokens or shorten 'text'"
        )

    def pixel_values(self, items: Sequence[ModelInput]) -> torch.Tensor:
        images = [item.image for item in items]
        if self.device_pixels is not None:
            return self.device_pixels(images, self.dtype)  # (B, 3, H, W)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")
        values: torch.Tensor = pixels["pixel_values"].to(self.device, self.dtype)
        return values  # (B, 3, H, W)

    def generate_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kwargs = params.generate_kwargs()
        if kwargs.get("do_sample") is False:
            # Sampling knobs without sampling would only trigger transformers warnings.
            for key in ("temperature", "top_p", "top_k"):
                kwargs.pop(key, None)
        return kwargs

    def search(self, params: GenerationParams) -> tuple[int, bool]:
        """The beams and whether to sample, as ``generate`` will: ``params`` over the
        model's ``generation_config``."""
        config = self.model.generation_config
        beams = params.num_beams or int(config.num_beams or 1)
        sampling = params.do_sample if params.do_sample is not None else bool(config.do_sample)
        return beams, sampling

    def check_params(self, params: GenerationParams) -> None:
        """Refuse several texts per row where this model's defaults cannot give them
        (what :class:`GenerationParams` cannot tell alone); ``generate`` would fail the
        whole batch instead."""
        n = params.num_return_sequences or 1
        if n == 1:
            return
        beams, sampling = self.search(params)
        if beams > 1 and n > beams:
            raise InvalidInput(
                f"num_return_sequences ({n}) must not exceed num_beams ({beams}, this "
                "model's default): beam search returns at most num_beams texts"
            )
        if beams == 1 and not sampling:
            raise InvalidInput(
                f"num_return_sequences ({n}) needs beam search (num_beams of at least {n}) or "
                "sampling (do_sample true): this model decodes greedily by default, which "
                "has one answer"
            )

    def generate(self, params: GenerationParams, **inputs: Any) -> torch.Tensor:
        """``model.generate(**inputs)`` (tensors, and any extra argument) with ``params``:
        token ids (B * k, L), each row's k = ``num_return_sequences`` texts side by side,
        best first.

        Beam search returns its best beams in that order already.  Samples come in the
        order drawn, so with several of them the model's raw logits are kept (B * k rows
        of the vocabulary per step: on a GPU, 32 rows of 16 samples of 30 tokens over OPT's
        50k words hold 1.5 GB in bfloat16) to order them by their mean log-probability.

        With a ``streamer`` (:meth:`streaming`), samples stay in the order drawn: a stream
        cannot wait to order them.
        """
        kwargs = {**self.generate_kwargs(params), **inputs}
        k = params.num_return_sequences or 1
        if k == 1 or self.search(params)[0] > 1 or "streamer" in inputs:
            out: torch.Tensor = self.model.generate(**kwargs)
            return out
        drawn = self.model.generate(**kwargs, return_dict_in_generate=True, output_logits=True)
        new = drawn.sequences[:, -len(drawn.logits) :]  # (B * k, S) the generated tokens
        order = _best_first(new, drawn.logits, self.generated(new), k)
        best_first: torch.Tensor = drawn.sequences[order]
        return best_first

    def streaming(
        self, items: Sequence[ModelInput], *, prompt_in_text: bool = False
    ) -> dict[str, Any]:
        """:meth:`generate`'s ``streamer`` for a batch whose rows have sinks
        (:data:`~blipserve.types.TextSink`): each row's texts in pieces as they are
        decoded (``prompt_in_text``: the answers start with the prompt, which is sent as
        soon as the first token follows it).  None (``{}``) when no row streams, and under
        beam search, which settles its beams only at the end (transformers streams no
        beams): the caller has the texts when ``generate`` returns."""
        sinks = [item.on_text for item in items]
        if all(sink is None for sink in sinks) or self.search(items[0].params)[0] > 1:
            return {}
        streamer = RowStreamer(
            self.tokenizer, sinks, texts_per_row(items), prompt_in_text=prompt_in_text
        )
        return {"streamer": streamer}

    def end_token_ids(self) -> list[int]:
        """The tokens that end a generated text (``generate``'s ``eos_token_id``)."""
        ends = self.model.generation_config.eos_token_id
        return [] if ends is None else [ends] if isinstance(ends, int) else list(ends)

    def generated(self, new: torch.Tensor) -> torch.Tensor:
        """Which of the tokens ``new`` (N, S) after a prompt a text generated: its tokens up
        to its first end token (included), not the padding or end tokens that fill the
        rest (greedy search pads, beam search repeats the end token)."""
        ends = torch.tensor(self.end_token_ids(), dtype=new.dtype, device=new.device)
        is_end = torch.isin(new, ends).int()  # (N, S)
        past_end = (is_end.cumsum(dim=1) - is_end) > 0  # after the first end token
        pad = self.tokenizer.pad_token_id
        padding = new == pad if pad is not None else torch.zeros_like(past_end)
        return ~(past_end | padding)

    def decode(
        self, token_ids: torch.Tensor, new_from: int = 0, *, per_row: int = 1
    ) -> list[Prediction]:
        """Texts of ``token_ids`` (B * per_row, L), one prediction per row; ``new_from`` is
        where generated tokens start; ``per_row``: the texts each row asked for, side by
        side and best first, as :meth:`generate` returns them.

        Each text counts its generated tokens (padding excluded), which the OpenAI route
        reports as usage and uses to tell a ``length`` finish from a ``stop``.
        """
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        new = token_ids[:, new_from:]  # (B * per_row, L - new_from)
        counts = self.generated(new).sum(dim=-1).tolist()
        each = [Prediction(t.strip(), tokens=int(n)) for t, n in zip(texts, counts, strict=True)]
        if per_row == 1:
            return each
        return [Prediction.best_first(each[i : i + per_row]) for i in range(0, len(each), per_row)]


@dataclass(frozen=True)
class GenerateInputs:
    """A batch's ``generate`` inputs, as a family makes them: ``tensors`` (pixel values,
    token ids, masks, any family's own); ``prompt_columns``, the leading columns of
    ``generate``'s output that echo the prompt and are cut before decoding (decoder-only
    language models return prompt + continuation); ``new_from``, where generated tokens
    start in what is left (after a decoder start token, or BLIP's caption prefix, which the
    caption keeps)."""

    tensors: dict[str, torch.Tensor]
    prompt_columns: int = 0
    new_from: int = 0


def texts_per_row(items: Sequence[ModelInput]) -> int:
    """How many texts each row of a batch asked for (rows of a batch share parameters)."""
    return items[0].params.num_return_sequences or 1


def _best_first(
    new: torch.Tensor, logits: Sequence[torch.Tensor], real: torch.Tensor, k: int
) -> torch.Tensor:
    """The order (B * k,) that puts each row's k samples ``new`` (B * k, S) best first: by
    the mean log-probability under the model (``logits``: one (B * k, V) tensor per step)
    of their ``real`` tokens (B * k, S), as beam search's scores are length-normalised."""
    picked = [
        step.float().log_softmax(dim=-1).gather(-1, new[:, i : i + 1])  # (B * k, 1)
        for i, step in enumerate(logits)
    ]
    logprobs = torch.cat(picked, dim=1)  # (B * k, S)
    mean = torch.where(real, logprobs, 0.0).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    order = mean.view(-1, k).argsort(dim=1, descending=True, stable=True)  # (B, k)
    return (order + k * torch.arange(order.shape[0], device=order.device)[:, None]).flatten()
