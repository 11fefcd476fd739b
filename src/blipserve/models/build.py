"""One way to build a model: a :class:`~blipserve.config.ModelConfig` (the model's spec:
what to load, on which device, in which precision, with which speed options; frozen) ->
:func:`build_model` -> an adapter that does not change afterwards.

The build is a list of declared steps applied here, in this order, each with its
precondition, and each reported (:class:`~blipserve.models.optimize.BuildStep`: what it is,
the kernel or runtime that runs it, whether it was applied and if not why):

1. load the weights and processor (``from_pretrained``; for int8 in the checkpoint's own
   dtype, :mod:`~blipserve.models.weights`), or take a float32 model already built
   (``pretrained``: the benchmarks' random-weight models of real sizes);
2. the vision encoder on OpenVINO (``--backend``), converted from the float weights;
3. the family's speed options (``speedups``: glibc's allocator, lean text layers, vision
   attention, int8 layers), each where its check passes; in int8, what was not quantized
   then copied out of the checkpoint's file in float32;
4. the vision encoder split into calls of at most ``--vision-batch-size`` images;
5. decoding with a static KV cache (``--cuda-graphs``), where the family supports it;
6. images resized on the model's device (``--image-resize``).

What the user asked for by name (a backend, a batch split, CUDA graphs, device resizing)
fails the build with a :class:`~blipserve.errors.ModelLoadError` when it cannot apply; what
``auto`` picked is skipped with a warning and reported.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from blipserve.config import ModelConfig
from blipserve.errors import ModelLoadError
from blipserve.models import openvino_vision, optimize
from blipserve.models.base import HFAdapter
from blipserve.models.memory import release_freed_memory
from blipserve.models.optimize import BuildStep, Speedup
from blipserve.models.pixels import DevicePixels, image_side
from blipserve.models.precision import (
    Precision,
    resolve_device,
    resolve_precision,
    resolve_vision_backend,
    vision_precision,
)
from blipserve.models.registry import ADAPTERS
from blipserve.models.source import first_line, load_config, resolve_source
from blipserve.models.vision_encoder import split_vision_batches
from blipserve.models.weights import load_dtype, own_weights, settle_config_dtype

log = logging.getLogger(__name__)


def build_model(spec: ModelConfig, *, pretrained: tuple[Any, Any] | None = None) -> HFAdapter:
    """Build the adapter ``spec`` describes.

    ``pretrained``: a (float32 model, processor) built already, used instead of loading
    ``spec.model`` (which then only names it); every other step is the same.  Every failure
    is a :class:`ModelLoadError` naming the model and what to do.
    """
    if pretrained is None:
        source = resolve_source(spec.model)
        config = load_config(spec.model, source, spec.revision)
    else:
        source, config = spec.model, pretrained[0].config
    family = family_of(spec.model, config)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.dtype, device, spec.int8_kernel)
    if spec.cuda_graphs and device.type != "cuda":
        raise ModelLoadError(
            f"--cuda-graphs needs a CUDA GPU; model {spec.model!r} would run on {device.type}"
        )
    vision = resolve_vision_backend(spec.backend, device, precision, family.openvino_when_auto)
    how = f"int8 ({precision.int8_kernel}'s kernel)" if precision.int8 else str(precision)
    log.info(
        "loading %s (%s) on %s as %s, vision encoder on %s",
        *(spec.model, family.kind, device, how, vision),
    )
    try:
        if pretrained is None:
            model, processor = _from_pretrained(family, source, device, precision, spec.revision)
        else:
            model, processor = pretrained
            model.to(device=device, dtype=precision.dtype).eval()
        return _build(spec, family, source, model, processor, device, precision, vision)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"model {spec.model!r} ({source}) could not be loaded as {family.kind}: "
            f"{first_line(exc)}"
        ) from exc


def family_of(name: str, config: Any) -> type[HFAdapter]:
    """The adapter class registered for ``config``'s architecture."""
    architectures: list[str] = list(getattr(config, "architectures", None) or [])
    family = next((ADAPTERS[a] for a in architectures if a in ADAPTERS), None)
    if family is None:
        found = ", ".join(architectures) or f"model_type {getattr(config, 'model_type', '?')!r}"
        raise ModelLoadError(
            f"model {name!r} has architecture {found}, which blipserve does not serve; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return family


def _from_pretrained(
    family: type[HFAdapter],
    source: str,
    device: torch.device,
    precision: Precision,
    revision: str | None,
) -> tuple[Any, Any]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source, revision=revision)
    dtype = load_dtype(precision, source, revision)  # (int8: the file's; models/weights.py)
    model = family.model_class.from_pretrained(source, revision=revision, dtype=dtype)
    if dtype != precision.dtype:
        settle_config_dtype(model, precision.dtype)
    return model.to(device).eval(), processor


def _check_disabled(
    spec: ModelConfig, family: type[HFAdapter], speedups: list[Speedup], precision: Precision
) -> None:
    """Refuse a ``--disable-speedup`` name that no model gets anywhere (a typo); warn of
    one that this model does not get here (another CPU, precision or family has it)."""
    absent = set(spec.disable_speedup) - {s.name for s in speedups}
    typos = absent - optimize.ALL_NAMES
    here = f"model {spec.model!r} ({family.kind})"
    gets = ", ".join(repr(s.name) for s in speedups) or "none"
    if typos:
        raise ModelLoadError(
            f"--disable-speedup: {here} gets no speed option named "
            f"{', '.join(sorted(map(repr, typos)))} here or on any other host; it gets: {gets}"
        )
    for name in sorted(absent):
        log.warning(
            "--disable-speedup %r: %s does not get that option on this host in %s; "
            "nothing to leave out (it gets: %s)",
            *(name, here, precision, gets),
        )


def _build(
    spec: ModelConfig,
    family: type[HFAdapter],
    source: str,
    model: Any,
    processor: Any,
    device: torch.device,
    precision: Precision,
    vision: str,
) -> HFAdapter:
    steps: list[BuildStep] = []
    elsewhere = None  # what runs the vision encoder if not torch
    if vision == "openvino":  # converted from the float weights, before anything else
        steps.append(_openvino_vision(spec, family, model, processor, precision))
        elsewhere = "OpenVINO" if steps[-1].applied else None
    if spec.vision_attention != "auto" and not family.vision_attentions:
        raise ModelLoadError(
            f"--vision-attention: model {spec.model!r} ({family.kind}): it applies to BLIP "
            "models' vision encoder"
        )
    speedups = family.speedups(precision, device, spec.vision_attention)
    _check_disabled(spec, family, speedups, precision)
    steps += optimize.prepare(model, speedups, spec.disable_speedup, elsewhere)
    if precision.int8:  # what was not quantized: out of the checkpoint, in float32
        copied = own_weights(model, precision.dtype)
        log.info("weights kept in %s: %.2f GiB", precision, copied / 2**30)
        gc.collect()  # (replaced layers in reference cycles still hold views of the file)
        release_freed_memory()
    if spec.vision_batch_size:
        steps.append(_split_vision(spec, model, steps, precision))
    if spec.cuda_graphs:
        why = family.static_cache_refusal(model.config)
        if why:
            raise ModelLoadError(f"--cuda-graphs: model {spec.model!r} ({family.kind}): {why}")
        steps.append(BuildStep("static KV cache", "torch.compile (CUDA graphs)"))
    pixels = _device_pixels(spec, processor, device, steps)
    for step in steps:
        state = "" if step.applied else f" (skipped: {step.why})"
        log.info("build step: %s on %s%s", step.name, step.runs_on, state)
    return family(
        model,
        processor,
        device,
        precision,
        source=source,
        static_cache=spec.cuda_graphs,
        device_pixels=pixels,
        build=tuple(steps),
    )


def _openvino_vision(
    spec: ModelConfig, family: type[HFAdapter], model: Any, processor: Any, precision: Precision
) -> BuildStep:
    """The vision encoder on OpenVINO; with ``--backend auto`` torch's where OpenVINO
    cannot take it (reported), else the build fails."""
    mode = vision_precision(precision, family.vision_int8)
    runs_on = f"OpenVINO {openvino_vision.version()} ({mode})"
    try:
        openvino_vision.use_openvino_vision(
            model, processor.image_processor, image_side(processor), precision.dtype, mode
        )
    except ModelLoadError as exc:
        if spec.backend != "auto":
            raise
        log.warning("vision encoder stays on torch: %s", exc)
        model.vision_model.to(precision.dtype)  # (converted from a float32 copy)
        return BuildStep("vision encoder on OpenVINO", runs_on, applied=False, why=str(exc))
    return BuildStep("vision encoder on OpenVINO", runs_on)


def _split_vision(
    spec: ModelConfig, model: Any, steps: list[BuildStep], precision: Precision
) -> BuildStep:
    """``--vision-batch-size``: the vision encoder on at most that many images a call."""
    on_openvino = any(s.applied and s.name == "vision encoder on OpenVINO" for s in steps)
    why = (
        "its vision encoder runs on OpenVINO (use --backend torch)"
        if on_openvino
        else "in int8 the vision encoder takes one image per call already"
        if precision.int8
        else None
    )
    if why:
        raise ModelLoadError(f"--vision-batch-size: model {spec.model!r}: {why}")
    split_vision_batches(model, spec.vision_batch_size)
    return BuildStep(f"vision encoder {spec.vision_batch_size} images a call", "torch")


def _device_pixels(
    spec: ModelConfig, processor: Any, device: torch.device, steps: list[BuildStep]
) -> DevicePixels | None:
    """Images resized and normalised with torch on the model's device (on a GPU only 8-bit
    pixels cross to it) instead of by the image processor on the CPU, where asked
    (``device``) or picked (``auto`` on a GPU); where the processor does something else it
    stays (``auto``, reported) or the build fails (``device``)."""
    wanted = spec.image_resize == "device" or (
        spec.image_resize == "auto" and device.type == "cuda"
    )
    if not wanted:
        return None
    pixels = DevicePixels.of(processor.image_processor, device)
    if pixels is not None:
        steps.append(BuildStep("images resized on the device", f"torch ({device.type})"))
        return pixels
    what = type(processor.image_processor).__name__
    why = (
        f"{spec.model}'s image processor ({what}) does more than a fixed-size bilinear or "
        "bicubic resize and normalisation"
    )
    if spec.image_resize == "device":
        raise ModelLoadError(f"--image-resize device: {why}; use --image-resize processor")
    log.info("images stay with %s on the CPU", what)
    steps.append(BuildStep("images resized on the device", "torch", applied=False, why=why))
    return None
