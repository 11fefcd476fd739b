"""Precision and placement policy: the device, the dtype (or int8 on whose kernel) and
who runs the vision encoder, from ``--device``, ``--dtype``, ``--int8-kernel`` and
``--backend``; ``auto`` picks the fastest mode measured to keep the models' answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blipserve.errors import ModelLoadError
from blipserve.models import int8_kernel, int8_linear, openvino_vision
from blipserve.models.int8_linear import int8_available


def resolve_device(device: str) -> torch.device:
    """``--device`` -> the torch device; ``auto`` is a CUDA GPU where there is one."""
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


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that this process may use (Intel Sapphire Rapids and
    later), where oneDNN runs torch's bfloat16 matmuls on them: about 1 TMAC/s on 2 cores
    for a (4616, 768) x (768, 1536) product, against 0.15 for float32 and ~0.25 for
    blipserve's int8 kernel (AVX-512 VNNI) on the same Xeon."""
    try:
        # Asks Linux for the tile state (arch_prctl), as oneDNN does; False where refused.
        return bool(torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


def amx_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CPU that runs bfloat16 natively and on AMX tiles (where the
    int8 mode keeps the products with many rows in bfloat16)."""
    return device.type == "cpu" and cpu_has_native_bf16() and cpu_has_amx()


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
    if kernel == "auto" and int8_kernel.load() is not None:
        return Precision(torch.float32, int8=True, int8_kernel="blipserve")
    why = int8_available(kernel=False)
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

    ``auto`` is OpenVINO for an int8 model on a CPU with VNNI where OpenVINO and NNCF are
    installed and the family's adapter asks for it (``when_auto``:
    ``HFAdapter.openvino_when_auto``), else torch.
    As measured on the 2-core Zen 4 this was built on (bench/speed.py, passes interleaved,
    full-size BLIP-base, bench/results/speed-cpu-openvino-int8.json): batch 8 4.31 vs 3.12
    images/s, batch 1 2.61 vs 2.24, a lone image 427 vs 588 ms, the demo model's captions
    the same as float32's for 99.0% of 200 held-out scenes either way.  In bfloat16 and
    float32 OpenVINO's encoder was not faster in the engine (bench/results/
    speed-cpu-openvino*.json), so ``auto`` keeps torch there.  Without VNNI (an AVX2-only
    AMD EPYC) OpenVINO's static int8 encoder was the slowest of all, 981 ms an image
    against torch's int8 on fbgemm 558 and either's float32 about 855, and the engine ran
    1.41 against 0.82 images/s at batch 8 (bench/results/openvino-encoder-avx2.json,
    speed-cpu-avx2.json).
    """
    if name == "torch":
        return "torch"
    why = openvino_vision.unavailable(device)
    if why is None and precision.int8:
        why = openvino_vision.int8_unavailable()
    if name == "auto":
        int8_encoder = why is None and precision.int8 and when_auto
        return "openvino" if int8_encoder and int8_linear.cpu_has_vnni() else "torch"
    if why is not None:
        raise ModelLoadError(f"--backend openvino is not available here: {why}")
    return "openvino"


def vision_precision(precision: Precision, int8: str = "int8-static") -> str:
    """OpenVINO's precision for the encoder of a model loaded in ``precision``: ``f32``
    (float32: exact); ``int8`` (``int8-static`` or ``int8-dynamic``: the family's recipe);
    else ``bf16`` where the CPU has it natively, else ``f32``."""
    if precision.int8:
        return int8
    if precision.dtype == torch.float32 or not cpu_has_native_bf16():
        return "f32"
    return "bf16"
