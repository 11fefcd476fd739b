"""blipserve's own int8 linear kernel (int8_kernel.c): exact against its definition,
batch- and thread-invariant, built once, and refused cleanly where it cannot be had."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from blipserve.models import int8_kernel

# compiles the C kernel: not in the fast tier
pytestmark = pytest.mark.heavy

CAN_BUILD = all(f in int8_kernel.cpu_flags() for f in int8_kernel._CPU_FLAGS) and bool(
    shutil.which("cc") or shutil.which("gcc")
)
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="no AVX-512 VNNI CPU or C compiler")


def test_the_kernel_loads_where_it_can_be_built() -> None:
    # Where this CPU and a compiler allow it, a failure to build or to pass the first call's
    # check is a bug, not a reason to fall back quietly.
    if CAN_BUILD:
        assert int8_kernel.load() is not None, int8_kernel.unavailable()
        assert int8_kernel.unavailable() is None
    else:
        assert int8_kernel.load() is None
        assert int8_kernel.unavailable()


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in torch: per-row and per-output scales, exact integer sums."""
    w_scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
    w = torch.round(weight / w_scale[:, None]).clamp(-127, 127).to(torch.int64)
    amax = x.abs().amax(dim=1)  # (M,)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(x * inv[:, None]).to(torch.int64)  # (M, K) in [-127, 127]
    sums = (codes @ w.T).double()  # (M, N), exact
    out = sums * (w_scale[None, :].double() * (amax[:, None].double() / 127))
    return (out if bias is None else out + bias.double()).float()


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    # (1040 and 2063 outputs: packed in several slices of outputs, the last one partial)
    [(1, 768, 768), (3, 70, 37), (9, 96, 40), (20, 8, 1), (2, 40, 1040), (3, 70, 2063)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_its_definition(rows: int, k: int, n: int, with_bias: bool) -> None:
    kernel = int8_kernel.load()
    assert kernel is not None
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    weight = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[0, 0] = 0.0
    got = kernel.pack(weight, bias)(x)
    want = reference(x, weight, bias)
    assert got.shape == (rows, n)
    # (the kernel rounds once in a fused multiply-add where torch rounds twice)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    float_error = (got - functional.linear(x, weight, bias)).norm() / want.norm()
    assert float_error < 0.02


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packing_a_half_precision_weight_is_packing_its_float32_copy(dtype: torch.dtype) -> None:
    # (how int8 models load: quantized from the checkpoint's own dtype, models/weights.py)
    kernel = int8_kernel.load()
    assert kernel is not None
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(1100, 72, generator=g).to(dtype)
    x = torch.randn(5, 72, generator=g)
    half, full = kernel.pack(weight, None), kernel.pack(weight.float(), None)
    assert torch.equal(half.weight, full.weight)
    assert torch.equal(half(x), full(x))


@needs_kernel
def test_a_row_is_the_same_alone_in_a_batch_and_on_any_thread_count() -> None:
    kernel = int8_kernel.load()
    assert kernel is not None
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(3000, generator=g)
    layer = kernel.pack(torch.randn(3000, 384, generator=g), bias)
    x = torch.randn(13, 384, generator=g)
    x[4] *= 1e4
    x[7] = 0.0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = layer(x)
        torch.set_num_threads(1)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(13)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(together, alone)
    assert torch.equal(together[7], bias)  # a zero row gives the bias


@needs_kernel
def test_threads_calling_at_once_get_their_own_results() -> None:
    kernel = int8_kernel.load()
    assert kernel is not None
    g = torch.Generator().manual_seed(1)
    layer = kernel.pack(torch.randn(512, 256, generator=g), None)
    inputs = [torch.randn(r, 256, generator=g) for r in (1, 2, 5, 8, 1, 3)]
    want = [layer(x) for x in inputs]
    got: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        got[i] = [layer(inputs[i]) for _ in range(50)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in got.items():
        assert all(torch.equal(out, want[i]) for out in outs)


@needs_kernel
def test_the_build_is_cached_and_survives_an_unwritable_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    openmp = int8_kernel._torch_openmp()
    assert compiler
    assert openmp
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = int8_kernel._build(compiler, openmp)
    assert first.parent == tmp_path / "cache" / "blipserve" / "kernels"
    stamp = first.stat().st_mtime_ns
    assert int8_kernel._build(compiler, openmp) == first
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert int8_kernel._check(int8_kernel.Kernel(first)) is None
    # a cache "folder" that is a file: the build goes to the temporary folder instead
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    fallback = int8_kernel._build(compiler, openmp)
    assert fallback.exists()
    assert not str(fallback).startswith(str(tmp_path / "file"))


def test_reasons_for_not_using_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_kernel, "cpu_flags", lambda: {"avx512f"})
    assert "avx512_vnni" in str(int8_kernel._load())
    monkeypatch.setattr(int8_kernel, "cpu_flags", lambda: set(int8_kernel._CPU_FLAGS))
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    if int8_kernel._torch_openmp() is not None:
        assert int8_kernel._load() == "no C compiler (cc) found"


@needs_kernel
def test_a_broken_build_falls_back_with_the_compiler_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(int8_kernel, "SOURCE", bad)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    why = int8_kernel._load()
    assert isinstance(why, str)
    assert why.startswith("building it failed")
    assert "bad.c" in why
