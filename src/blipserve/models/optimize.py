"""The speed options a loaded model can get, and :func:`prepare`, which applies them.

Each model family's adapter declares which options its model gets, in which order, for a
precision and device (``HFAdapter.speedups``); :func:`prepare` applies that list, each
option only where its check passes, and reports what it did (:class:`BuildStep`).  The
options themselves, each measured in ``bench/speed.py``:

* :data:`KEEP_FREED_MEMORY` — glibc keeps freed blocks for reuse
  (:func:`~blipserve.models.memory.keep_freed_memory`);
* :data:`LEAN_TEXT_LAYERS` — BLIP's text layers with fused projections and a quarter of the
  module calls (:mod:`blipserve.models.lean_text`), after proving on the live model that
  they compute what transformers' layers compute (:mod:`~blipserve.models.lean_text_check`);
* :func:`vision_attention` — BLIP's vision attention through SDPA, or with its products in
  bfloat16 (:mod:`blipserve.models.vision_encoder`);
* :func:`int8_layers` — ``nn.Linear`` layers in int8 (:mod:`blipserve.models.int8_linear`),
  the vision encoder's run one image per call; on CPUs with AMX, the vision encoder
  (:data:`AMX_VISION`) and BLIP's projections of the image tokens to the cross-attention's
  keys and values (:data:`AMX_IMAGE_KEYS_VALUES`) in bfloat16 instead.

Steps that change the vision encoder on torch (``Speedup.torch_vision``) are skipped, and
reported so, where OpenVINO runs it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from blipserve.models.int8_linear import quantize_linears
from blipserve.models.lean_text import (
    keep_image_keys_values_in,
    lean_text_layers,
    project_image_keys_values_in_bf16,
    quantize_image_keys_values,
)
from blipserve.models.lean_text_check import lean_text_refusal
from blipserve.models.memory import keep_freed_memory
from blipserve.models.precision import Precision
from blipserve.models.vision_encoder import (
    set_vision_attention,
    split_vision_batches,
    vision_in_bf16,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildStep:
    """What one step of building a model did: its name, what runs it (the kernel or runtime)
    and, when it was skipped, why.  Reported in ``/ready``, the load log and bench results."""

    name: str
    runs_on: str
    applied: bool = True
    why: str = ""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"step": self.name, "runs_on": self.runs_on}
        out["applied"] = self.applied
        if self.why:
            out["why"] = self.why
        return out


@dataclass(frozen=True)
class Speedup:
    """One speed option: its name, what runs it, the change it makes to a model (in place)
    and ``refusal``, its precondition: why it cannot apply to a model (None: it can).  A
    refused option is skipped, the model keeps transformers' own code, and the build says
    so; an option that cannot be skipped is not an option but a requirement (those raise
    :class:`~blipserve.errors.ModelLoadError` while loading)."""

    name: str  # (no commas: --disable-speedup's variable takes a comma-separated list)
    apply: Callable[[nn.Module], object]
    runs_on: str = "torch"
    refusal: Callable[[nn.Module], str | None] | None = None
    torch_vision: bool = False  # it changes the vision encoder on torch


def prepare(
    model: nn.Module,
    speedups: Iterable[Speedup],
    disabled: Iterable[str] = (),
    vision_elsewhere: str | None = None,
) -> list[BuildStep]:
    """Apply ``speedups`` (an adapter's ``speedups(precision, device)``) to ``model``, in
    order, each where its precondition holds and not ``disabled`` (``--disable-speedup``);
    what was done, step by step.  ``vision_elsewhere``: what runs the vision encoder
    instead of torch (the steps for torch's are then skipped)."""
    done: list[BuildStep] = []
    applied: set[str] = set()
    off = set(disabled)
    for speedup in speedups:
        if speedup.name in off:
            done.append(BuildStep(speedup.name, speedup.runs_on, False, "--disable-speedup"))
            continue
        if speedup.torch_vision and vision_elsewhere:
            elsewhere = f"the vision encoder runs on {vision_elsewhere}"
            done.append(BuildStep(speedup.name, speedup.runs_on, applied=False, why=elsewhere))
            continue
        if REPLACED_BY.get(speedup.name) in applied:  # (a faster way did its work)
            replaced = f"replaced by {REPLACED_BY[speedup.name]}"
            done.append(BuildStep(speedup.name, speedup.runs_on, applied=False, why=replaced))
            continue
        why = speedup.refusal(model) if speedup.refusal else None
        if why is None and speedup.name in NEEDS and NEEDS[speedup.name] not in applied:
            why = f"needs {NEEDS[speedup.name]}, which was skipped"
        if why is not None:
            log.warning("%s: skipped (%s)", speedup.name, why)
            done.append(BuildStep(speedup.name, speedup.runs_on, applied=False, why=why))
            continue
        speedup.apply(model)
        applied.add(speedup.name)
        done.append(BuildStep(speedup.name, speedup.runs_on))
    log.debug("speedups applied: %s", ", ".join(applied) or "none")
    return done


def _not_glibc(model: nn.Module) -> str | None:
    return None if keep_freed_memory() else "not glibc (no mallopt)"


#: (for models on a CPU; the model itself is left as it is: the refusal sets it, once)
KEEP_FREED_MEMORY = Speedup("keep freed memory", lambda model: None, "glibc", _not_glibc)

#: Before any int8 option: its fused Linear layers are then quantized like any other.
#: BLIP-base int8, one image, 20 tokens: generate 613 vs 662 ms with transformers' layers
#: (medians of 7 interleaved runs); batch 8: no difference (3.43 vs 3.42 s).  Not measured
#: on a GPU yet, where per-call overhead matters at least as much.
LEAN_TEXT_LAYERS = Speedup("lean text layers", lean_text_layers, "torch", lean_text_refusal)


def vision_attention(how: str) -> Speedup:
    """BLIP's vision attention run ``how``: ``sdpa`` or ``bf16``
    (:func:`~blipserve.models.vision_encoder.set_vision_attention`)."""
    runs_on = "torch SDPA" if how == "sdpa" else "torch, bfloat16 products"
    attention = functools.partial(set_vision_attention, how=how)
    return Speedup(f"{how} vision attention", attention, runs_on, torch_vision=True)


def _torch_vision(model: nn.Module) -> nn.Module | None:
    """``model``'s vision encoder where torch runs it (None: it has none, or OpenVINO runs
    it: an encoder without parameters)."""
    vision = getattr(model, "vision_model", None)
    if not isinstance(vision, nn.Module) or not any(True for _ in vision.parameters()):
        return None
    return vision


def _amx_vision(model: nn.Module, out: torch.dtype) -> None:
    if _torch_vision(model) is not None:
        vision_in_bf16(model, out)


def int8_layers(
    precision: Precision, *, image_keys_values: bool = False, amx: bool = False
) -> list[Speedup]:
    """Every ``nn.Linear`` in int8, on ``precision``'s kernel (blipserve's or fbgemm's).

    First the vision encoder's (:func:`int8_vision`).  ``image_keys_values``: then the
    cross-attention keys and values of the image in lean BLIP text layers, with one scale
    per image (:func:`~blipserve.models.lean_text.quantize_image_keys_values`), or, with
    ``amx``, in bfloat16 on AMX (:data:`AMX_IMAGE_KEYS_VALUES`; the int8 step is then
    skipped as replaced, and applies again where that one is disabled).
    """
    own = precision.int8_kernel == "blipserve"  # (else fbgemm)
    kernel = int8_runs_on(precision)
    steps = int8_vision(precision, amx)
    if image_keys_values and amx:
        steps.append(AMX_IMAGE_KEYS_VALUES)
    if image_keys_values:
        keys_values = functools.partial(quantize_image_keys_values, kernel=own)
        steps.append(Speedup(INT8_IMAGE_KEYS_VALUES, keys_values, kernel))
    linears = functools.partial(quantize_linears, kernel=own)
    steps.append(Speedup("int8 linears", linears, kernel))
    return steps


def int8_vision(precision: Precision, amx: bool = False) -> list[Speedup]:
    """The vision encoder's Linear layers in int8, one image per call; with ``amx`` first
    the whole encoder in bfloat16 (:data:`AMX_VISION`; the int8 step is then skipped as
    replaced, and applies again where that one is disabled)."""
    vision = functools.partial(_int8_vision, kernel=precision.int8_kernel == "blipserve")
    int8 = Speedup(INT8_VISION, vision, int8_runs_on(precision), torch_vision=True)
    if not amx:
        return [int8]
    # (its output in the dtype the rest of the model computes in: not the checkpoint's)
    bf16 = functools.partial(_amx_vision, out=precision.dtype)
    return [Speedup(AMX_VISION, bf16, "torch bf16 matmul (AMX)", torch_vision=True), int8]


def int8_runs_on(precision: Precision) -> str:
    """Whose kernel computes ``precision``'s int8 matmuls, in words."""
    if precision.int8_kernel == "blipserve":
        return "blipserve's int8 kernel (AVX-512 VNNI)"
    return "torch's fbgemm int8 kernel"


#: after LEAN_TEXT_LAYERS, in int8 on CPUs with native bf16 (keep_image_keys_values_in)
BF16_IMAGE_KEYS_VALUES = Speedup(
    "bf16 image keys and values", keep_image_keys_values_in, "torch SDPA, bfloat16"
)

#: before the int8 steps, on CPUs with AMX (project_image_keys_values_in_bf16)
AMX_IMAGE_KEYS_VALUES = Speedup(
    "AMX image keys and values", project_image_keys_values_in_bf16, "torch bf16 matmul (AMX)"
)

#: before the int8 vision step, on CPUs with AMX (vision_in_bf16)
AMX_VISION = "AMX vision encoder (one image a call)"

INT8_VISION = "int8 vision encoder (one image a call)"
INT8_IMAGE_KEYS_VALUES = "int8 image keys and values"
#: Every speed option's name, whatever the model, precision and CPU: what
#: ``--disable-speedup`` accepts on any host (settings shared by a fleet may name an
#: option that one host's model does not get there; a name outside this set is a typo)
ALL_NAMES = frozenset(
    {
        KEEP_FREED_MEMORY.name,
        LEAN_TEXT_LAYERS.name,
        "sdpa vision attention",
        "bf16 vision attention",
        AMX_VISION,
        INT8_VISION,
        AMX_IMAGE_KEYS_VALUES.name,
        INT8_IMAGE_KEYS_VALUES,
        "int8 linears",
        "int8 Q-Former linears",
        BF16_IMAGE_KEYS_VALUES.name,
    }
)
#: a step -> the step it builds on (skipped when that one was)
NEEDS = {
    INT8_IMAGE_KEYS_VALUES: LEAN_TEXT_LAYERS.name,
    BF16_IMAGE_KEYS_VALUES.name: LEAN_TEXT_LAYERS.name,
    AMX_IMAGE_KEYS_VALUES.name: LEAN_TEXT_LAYERS.name,
}
#: a step -> the step that does its work another way where it applied (skipped then)
REPLACED_BY = {
    INT8_IMAGE_KEYS_VALUES: AMX_IMAGE_KEYS_VALUES.name,
    INT8_VISION: AMX_VISION,
}


def _int8_vision(model: nn.Module, kernel: bool) -> None:
    """The vision encoder one image per call, its Linear layers in int8 with one activation
    scale per image (per call); nothing for an encoder that runs on OpenVINO."""
    vision = _torch_vision(model)
    if vision is None:
        return
    # Measured on BLIP-base, batch 8: 272 ms per image one at a time vs 330-390 in one call
    # (the float32 activations of 8 images stream through memory) ...
    split_vision_batches(model, rows=1)
    # ... so its layers see one image at a time: one scale per image (Int8Linear).
    quantize_linears(vision, per_row=False, kernel=kernel)
