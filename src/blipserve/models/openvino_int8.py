"""The two int8 recipes for a vision encoder on OpenVINO, both through NNCF.

* ``int8-static`` (:func:`quantize`): weights and activations in int8, activation scales
  fixed by calibration (:mod:`blipserve.models.calibration`);
* ``int8-dynamic`` (:func:`compress_weights`): int8 weights; OpenVINO's CPU plugin
  quantizes each token's activations at run time.

:mod:`blipserve.models.openvino_vision` caches the result and compiles it; each model
family's adapter names its recipe (``HFAdapter.vision_int8``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

#: name the recipes below in the cache key: change them when a recipe changes
STATIC = "int8-nncf-performance-nosq-floatpatch-noise8-shapes8-v1"
WEIGHTS = "int8-nncf-weights-asym-v1"


def quantize(model: Any, calibration: list[Any]) -> Any:
    """``model`` (an OpenVINO ViT) with int8 weights and activations: NNCF's post-training
    quantization, calibrated on ``calibration`` (one-image pixel batches).

    The recipe, as measured on BLIP-base's ViT (random weights, full size; worst of six
    photographs' feature cosine to float32; bench/results/openvino-int8-trials.txt): NNCF's
    transformer preset as it comes 0.99653 (SmoothQuant on); without SmoothQuant 0.99936 on
    photo calibration, 0.99809 on generated images; symmetric activations
    (``PERFORMANCE``) 0.99902; and the patch embedding (a convolution over raw pixels) left
    in float 0.99953, against 0.99965 for blipserve's own int8 torch layers.  The
    attention's two matmuls carry no weights and stay in float.
    """
    import nncf

    patch_embedding = [
        op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "Convolution"
    ]
    with _quiet_nncf():
        return nncf.quantize(
            model,
            nncf.Dataset(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=patch_embedding, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
            ),
        )


def compress_weights(model: Any) -> Any:
    """``model`` with int8 weights (asymmetric, one scale and zero point per output
    channel; NNCF's data-free compression); OpenVINO's CPU plugin then quantizes each
    token's activations at run time, in groups of 32 (``DYNAMIC_QUANTIZATION_GROUP_SIZE``),
    and multiplies in int8."""
    import nncf

    with _quiet_nncf():
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF reports progress and logs on stdout, which is the CLI's output: progress goes
    to stderr, and its log says only warnings (its handler is bound to stdout itself)."""
    chatty = logging.getLogger("nncf")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        chatty.setLevel(level)


__all__ = ["STATIC", "WEIGHTS", "compress_weights", "quantize"]
