"""blipserve's own int8 linear kernel (``int8_kernel.c``) for CPUs with AVX-512 VNNI.

Compiled on first use with the system's C compiler (under a second) into the user's cache
folder, loaded with ctypes, and linked to the OpenMP runtime torch itself loaded, so that
its threads are torch's (``torch.set_num_threads`` applies per calling thread, as the
engine's model workers need).  Where it cannot be had -- no VNNI, no compiler, torch
without libgomp -- :func:`unavailable` says why and
:class:`~blipserve.models.optimize.Int8Linear` uses torch's fbgemm kernel instead (as it
does with ``--int8-kernel fbgemm``).

Measured on the 2-core Zen 4 this was written on (torch 2.13, medians of three sweeps over
BLIP-base's 73 decoder linears): one row on two threads 5.4-5.7 vs 8.0-10.5 ms with fbgemm
(and its per-row scaling passes); eight rows on one thread 9-17 vs 13-24 ms; the vision
encoder's 48 linears on one image's 577 rows 134-176 vs 160-177 ms against fbgemm with one
scale per call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch.nn import functional

from blipserve.cachedir import cache_folders

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernel.c")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fPIC"]
_BLOCK = 16  # outputs per block (int8_kernel.c)
_PACK_ROWS = 64 * _BLOCK  # outputs quantized at a time while packing

_P, _I = ctypes.c_void_p, ctypes.c_int64


def cpu_flags() -> set[str]:
    """The CPU's feature flags, as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_openmp() -> str | None:
    """The path of the libgomp this process loaded (torch's), if any."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith("libgomp") and ".so" in path:
            return path
    return None


def _build(compiler: str, openmp: str) -> Path:
    """Compile the kernel (once per source, flags, compiler and OpenMP runtime)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(_CFLAGS).encode(), compiler.encode(), openmp.encode()])
    ).hexdigest()[:16]
    for folder in cache_folders("kernels"):
        target = folder / f"int8_kernel-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as work:
                obj, lib = Path(work) / "k.o", Path(work) / "k.so"
                run = functools.partial(
                    subprocess.run, check=True, capture_output=True, timeout=120
                )
                run([compiler, *_CFLAGS, "-fopenmp", "-c", str(SOURCE), "-o", str(obj)])
                # Linked to torch's libgomp by path (not -lgomp, which could name another
                # copy): one OpenMP runtime, one set of threads, in the process.
                run([compiler, "-shared", str(obj), openmp, "-o", str(lib)])
                os.replace(lib, target)  # atomic: concurrent builders each write their own
            return target
        except OSError:
            continue  # an unwritable cache folder: try the temporary one
    raise OSError("no writable folder for the compiled kernel")


class Kernel:
    """The loaded kernel; :meth:`pack` prepares a layer's weights for it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fn = ctypes.CDLL(str(path)).blipserve_int8_linear
        self._fn.restype = None
        self._fn.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _I, _P, _P, _P]

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
        return PackedLinear(self._fn, weight, bias)


class PackedLinear:
    """A Linear's weights in the kernel's layout, and its forward (float32 out)."""

    def __init__(self, fn: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        n, k = weight.shape  # (N, K), in any float dtype
        kp, np_ = -(-k // 4) * 4, -(-n // _BLOCK) * _BLOCK
        # (Np/16, Kp/4, 16, 4): a 64-byte group is 4 inputs of 16 outputs (one VPDPBUSD);
        # zeros past the edges
        self.weight = torch.zeros(np_ // _BLOCK, kp // 4, _BLOCK, 4, dtype=torch.int8)
        self.scale = torch.zeros(np_)  # (Np,) one per output
        # The codes' zero point (128) times each output's weight sum, taken off the sums.
        self.zero_sums = torch.zeros(np_, dtype=torch.int32)  # (Np,)
        # Quantized a slice of outputs at a time, straight into the blocked layout: a
        # layer's float copies then stay a slice's size (an LM head's whole float32
        # weight and its temporaries were ~2 GB for OPT-2.7b's; models/weights.py)
        for start in range(0, n, _PACK_ROWS):
            w = weight[start : start + _PACK_ROWS].detach().float()  # (rows, K)
            rows = w.shape[0]
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (rows,)
            q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            del w
            padded = -(-rows // _BLOCK) * _BLOCK
            q = functional.pad(q, (0, kp - k, 0, padded - rows))  # (padded, Kp)
            first = start // _BLOCK  # (_PACK_ROWS is a multiple of _BLOCK)
            blocks = q.view(padded // _BLOCK, _BLOCK, kp // 4, 4).permute(0, 2, 1, 3)
            self.weight[first : first + padded // _BLOCK] = blocks
            self.zero_sums[start : start + padded] = q.sum(dim=1, dtype=torch.int32) * 128
            self.scale[start : start + rows] = scale
        self.bias = None if bias is None else functional.pad(bias.detach().float(), (0, np_ - n))
        self.in_features, self.out_features, self._kp = k, n, kp
        self._fn = fn
        self._weights = (
            self.weight.data_ptr(),
            self.zero_sums.data_ptr(),
            self.scale.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            n,
            np_,
        )

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (M, K) float32 -> (M, N) float32."""
        if rows.stride(-1) != 1 or rows.dtype != torch.float32:
            rows = rows.float().contiguous()
        m = rows.shape[0]
        out = torch.empty(m, self.out_features)
        codes, scales = _scratch(m, self._kp)
        self._fn(
            rows.data_ptr(), m, self.in_features, self._kp, rows.stride(0), *self._weights,
            out.data_ptr(), codes.data_ptr(), scales.data_ptr(),
        )  # fmt: skip
        return out


_local = threading.local()
_T = TypeVar("_T")


def per_thread(key: Hashable, make: Callable[[], _T]) -> _T:
    """What ``make()`` gives, kept per thread and ``key``: scratch buffers shared by all
    layers (a model has few distinct widths; a buffer per layer would hold hundreds of MB
    for 577-token images), a handful at a time, as decoding batch sizes vary."""
    try:
        kept: dict[Hashable, Any] = _local.kept
    except AttributeError:
        kept = _local.kept = {}
    if key not in kept:
        if len(kept) > 32:
            kept.clear()
        kept[key] = make()
    return cast(_T, kept[key])


def _scratch(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-call scratch: codes (rows, cols) and one scale per row."""
    return per_thread(
        ("int8 codes", rows, cols),
        lambda: (torch.empty(rows, cols, dtype=torch.uint8), torch.empty(rows)),
    )


def load() -> Kernel | None:
    """The kernel, built and checked on first call; None where it cannot be had (see
    :func:`unavailable`)."""
    found = _loaded()
    return found if isinstance(found, Kernel) else None


def unavailable() -> str | None:
    """Why :func:`load` gives None (None when it gives the kernel)."""
    found = _loaded()
    return None if isinstance(found, Kernel) else found


@functools.cache
def _loaded() -> Kernel | str:
    return _load()


def _load() -> Kernel | str:
    missing = [flag for flag in _CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    openmp = _torch_openmp()
    if openmp is None:
        return "torch did not load libgomp (its OpenMP runtime) in this process"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc) found"
    try:
        kernel = Kernel(_build(compiler, openmp))
        why = _check(kernel)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        why = f"building it failed: {exc} {detail.decode(errors='replace')[-500:]}".strip()
    if why:
        log.warning("int8 linears use torch's fbgemm kernel, not blipserve's own: %s", why)
        return why
    log.info("int8 linears use blipserve's AVX-512 VNNI kernel (%s)", kernel.path)
    return kernel


def _check(kernel: Kernel) -> str | None:
    """A first call against float32 arithmetic, odd shapes included."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 70, generator=generator)
    bias = torch.randn(37, generator=generator)
    x = torch.randn(11, 70, generator=generator)
    got = kernel.pack(weight, bias)(x)
    want = functional.linear(x, weight, bias)
    error = float((got - want).norm() / want.norm())
    return None if error < 0.02 else f"gave wrong results (relative error {error:.3f})"
