"""The adapter protocol every model family implements, and what they share.

An adapter is deliberately small (cf. LitServe's ``LitAPI``): it says what it does with a
row's text, how rows may be grouped into one batch, and turns a batch of decoded rows into
predictions.  Loading, device and dtype handling live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from blipserve.errors import InvalidInput, ModelLoadError
from blipserve.models.openvino_vision import OpenVinoVision
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction

log = logging.getLogger(__name__)

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

    def batch_key(self, item: ModelInput) -> Hashable:
        """Rows with equal keys may share one ``predict`` call with identical results."""
        ...

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        """Run one batch (already grouped by ``batch_key``); one prediction per item."""
        ...

    def count_tokens(self, text: str | None) -> int: ...

    @property
    def default_max_new_tokens(self) -> int: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16, AMX or ARM BF16).

    Without it torch emulates bf16 and is slower than float32, so ``auto`` keeps float32.
    """
    try:
        # The check oneDNN itself uses to pick its bf16 kernels (private but stable).
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """How a model computes: its float dtype, and whether its Linear layers run in int8
    (and on whose kernel: ``blipserve``'s or ``fbgemm``)."""

    dtype: torch.dtype
    int8: bool = False
    int8_kernel: str = "blipserve"  # (fbgemm where blipserve's cannot be built)

    def __str__(self) -> str:
        return "int8" if self.int8 else str(self.dtype).removeprefix("torch.")


_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _int8(kernel: str) -> Precision | str:
    """int8 on ``kernel`` (``auto``: blipserve's where it builds, else fbgemm), or why
    neither works here."""
    from blipserve.models import int8_kernel, optimize

    if kernel == "auto" and int8_kernel.load() is not None:
        return Precision(torch.float32, int8=True, int8_kernel="blipserve")
    why = optimize.int8_available(kernel=False)
    return Precision(torch.float32, int8=True, int8_kernel="fbgemm") if why is None else why


def resolve_precision(name: str, device: torch.device, int8_kernel: str = "auto") -> Precision:
    """``--dtype`` -> :class:`Precision` on ``device``; ``auto`` picks the fastest guarded mode.

    ``int8_kernel`` (``--int8-kernel``): ``auto`` takes blipserve's own kernel where it builds
    here (:mod:`blipserve.models.int8_kernel`), else fbgemm; ``fbgemm`` insists on fbgemm.

    Every mode ``auto`` may pick says what float32 says on the demo models' held-out scenes
    for at least 98% of them (tests/integration/test_demo_models.py; bench/speed.py).
    """

    if name == "int8":
        if device.type != "cpu":
            raise ModelLoadError(
                "--dtype int8 runs on CPUs only (fbgemm's int8 kernels); on a GPU use "
                "auto, bfloat16 or float16"
            )
        int8 = _int8(int8_kernel)
        if isinstance(int8, str):
            raise ModelLoadError(f"--dtype int8 is not available here: {int8}")
        return int8
    if name != "auto":
        return Precision(_FLOATS[name])
    if device.type == "cuda":
        # bf16 keeps fp32's exponent range (no overflow in the ViT) where the GPU has it.
        return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    int8 = _int8(int8_kernel)
    if isinstance(int8, Precision):
        # On the 2-core Zen 4 this was measured on, int8 linears run at 1.5-2x the bf16
        # matmul rate (VNNI) and read a quarter of float32's bytes per decoding step:
        # BLIP-base captions ~3x faster than float32 one at a time (README, Speed).
        return int8
    # With native bf16 the matmul peak is ~2.3x float32's and the weights stream at half
    # the bytes.
    return Precision(torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def resolve_vision_backend(
    name: str, device: torch.device, precision: Precision, when_auto: bool = True
) -> str:
    """``--backend`` -> who runs the vision encoder: ``openvino`` or ``torch``.

    ``auto`` is OpenVINO for an int8 model on a CPU where OpenVINO and NNCF are installed
    and the family's adapter asks for it (``when_auto``: ``HFAdapter.openvino_when_auto``),
    else torch.
    As measured on the 2-core Zen 4 this was built on (bench/speed.py, passes interleaved,
    full-size BLIP-base, bench/results/speed-cpu-openvino-int8.json): batch 8 4.31 vs 3.12
    images/s, batch 1 2.61 vs 2.24, a lone image 427 vs 588 ms, the demo model's captions
    the same as float32's for 99.0% of 200 held-out scenes either way.  In bfloat16 and
    float32 OpenVINO's encoder was not faster in the engine (bench/results/
    speed-cpu-openvino*.json), so ``auto`` keeps torch there.
    """
    from blipserve.models import openvino_vision

    if name == "torch":
        return "torch"
    why = openvino_vision.unavailable(device)
    if why is None and precision.int8:
        why = openvino_vision.int8_unavailable()
    if name == "auto":
        return "openvino" if why is None and precision.int8 and when_auto else "torch"
    if why is not None:
        raise ModelLoadError(f"--backend openvino is not available here: {why}")
    return "openvino"


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

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: torch.device,
        precision: Precision,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.precision = precision
        self.dtype = precision.dtype  # of the pixel values (and the model's float weights)
        self.image_size = _image_size(processor)
        self.source = str(getattr(model, "name_or_path", "") or self.kind)
        vision = getattr(model, "vision_model", None)
        self.vision_backend = "openvino" if isinstance(vision, OpenVinoVision) else "torch"

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: torch.device,
        precision: Precision,
        revision: str | None,
        vision: str = "torch",
        fallback: bool = False,
    ) -> HFAdapter:
        """``vision``: who runs the vision encoder (``torch`` or ``openvino``); ``fallback``:
        torch's encoder, with a warning, if OpenVINO cannot take this one (``--backend
        auto``), instead of failing."""
        from transformers import AutoProcessor

        from blipserve.models import openvino_vision, optimize

        processor = AutoProcessor.from_pretrained(source, revision=revision)
        model = cls.model_class.from_pretrained(source, revision=revision, dtype=precision.dtype)
        model.to(device).eval()
        if vision == "openvino":  # converted from the float weights, before anything else
            try:
                openvino_vision.use_openvino_vision(
                    model,
                    processor.image_processor,
                    _image_size(processor),
                    precision,
                    cls.vision_int8,
                )
            except ModelLoadError as exc:
                if not fallback:
                    raise
                log.warning("vision encoder stays on torch: %s", exc)
                model.vision_model.to(precision.dtype)  # (converted from a float32 copy)
        optimize.prepare(model, precision, device)
        adapter = cls(model, processor, device, precision)
        adapter.source = source
        return adapter

    def batch_key(self, item: ModelInput) -> Hashable:
        raise NotImplementedError

    def use_static_cache(self, name: str) -> None:
        """Decode with a static KV cache (``--cuda-graphs``), where the family supports it."""
        raise ModelLoadError(
            f"--cuda-graphs: model {name!r} ({self.kind}) does not support it; it applies to "
            "BLIP-2 models whose language model is decoder-only (OPT)"
        )

    def count_tokens(self, text: str | None) -> int:
        """Tokens the language model sees for ``text`` (usage reporting)."""
        return len(self.tokenizer(text)["input_ids"]) if text else 0

    @property
    def default_max_new_tokens(self) -> int:
        """What ``generate`` uses when a request sets no limit (transformers' is 20)."""
        config = self.model.generation_config
        return int(config.max_new_tokens or 20)

    def predict(self, items: Sequence[ModelInput]) -> list[Prediction]:
        raise NotImplementedError

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

    def decode(self, token_ids: torch.Tensor, new_from: int = 0) -> list[Prediction]:
        """Texts of ``token_ids`` (B, L); ``new_from`` is where generated tokens start.

        Each prediction counts its generated tokens (padding excluded), which the OpenAI
        route reports as usage and uses to tell a ``length`` finish from a ``stop``.
        """
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        new = token_ids[:, new_from:]  # (B, L - new_from)
        counts = (new != self.tokenizer.pad_token_id).sum(dim=-1).tolist()
        return [Prediction(t.strip(), tokens=int(n)) for t, n in zip(texts, counts, strict=True)]


def _image_size(processor: Any) -> int:
    size = getattr(processor.image_processor, "size", None) or {}
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        values = [v for k, v in size.items() if k in ("height", "width", "shortest_edge")]
        if values:
            return int(min(values))
    try:
        return int(min(getattr(size, "height"), getattr(size, "width")))  # noqa: B009  (SizeDict)
    except (AttributeError, TypeError):
        log.warning("could not read the processor's image size; assuming 384")
        return 384
