"""The vision encoder on OpenVINO: transformers' own features, on real photographs.

Random-weight encoders shaped like the published checkpoints (tests/data/hf-layouts):
BLIP-base's ViT (all 12 layers, 384 px) and BLIP-2's ViT-g at its real width (1408, 224
px) with two of its 39 layers, so the test stays seconds long.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from blipserve.config import ModelConfig
from blipserve.engine import default_model_workers
from blipserve.errors import ModelLoadError
from blipserve.models import build_model, int8_linear
from blipserve.models.precision import (
    Precision,
    cpu_has_native_bf16,
    resolve_vision_backend,
    vision_precision,
)
from helpers import photos
from testkit.models import random_vision_encoder

ov = pytest.importorskip("openvino", reason="no OpenVINO wheel for this platform")

# converts models to OpenVINO and quantizes them: not in the fast tier
pytestmark = pytest.mark.heavy

from blipserve.models import openvino_vision  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache for the module's conversions (each encoder is converted once)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "blipserve" / "openvino"


def encoder(layout: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-weight vision encoder of ``layout`` and the photos as its pixel values."""
    model, processor = random_vision_encoder(layout)
    pixels = processor(images=list(photos().values()), return_tensors="pt")["pixel_values"]
    return model, pixels  # pixels: (6, 3, S, S)


@pytest.fixture(scope="module", params=["blip-image-captioning-base", "blip2-opt-2.7b"])
def model_and_pixels(request: pytest.FixtureRequest) -> tuple[Any, torch.Tensor]:
    return encoder(request.param)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst image's cosine between two (B, N, D) feature tensors."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return float(torch.nn.functional.cosine_similarity(a, b).min())


def test_float32_is_transformers_own_and_bf16_close(
    model_and_pixels: tuple[Any, torch.Tensor],
) -> None:
    model, pixels = model_and_pixels
    size = pixels.shape[-1]
    with torch.no_grad():
        want = model(pixel_values=pixels)
    exact = openvino_vision.compile_vision(model, size, torch.float32, "f32")
    got = exact(pixel_values=pixels)
    assert exact.precision == "f32"
    assert cosine(got.last_hidden_state, want.last_hidden_state) > 0.99999
    assert cosine(got.pooler_output[:, None], want.pooler_output[:, None]) > 0.99999
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=2e-3, rtol=1e-3)
    if not cpu_has_native_bf16():
        return
    fast = openvino_vision.compile_vision(model, size, torch.float32, "bf16")
    assert fast.precision == "bf16"
    assert cosine(fast(pixel_values=pixels).last_hidden_state, want.last_hidden_state) >= 0.999


def test_a_batch_equals_its_images_one_at_a_time(
    model_and_pixels: tuple[Any, torch.Tensor],
) -> None:
    model, pixels = model_and_pixels
    compiled = openvino_vision.compile_vision(model, pixels.shape[-1], torch.float32, "bf16")
    batch = compiled(pixel_values=pixels).last_hidden_state
    one_by_one = torch.cat([compiled(pixel_values=p[None]).last_hidden_state for p in pixels])
    assert torch.equal(batch, one_by_one)
    as_tuple = compiled(pixel_values=pixels[:2], return_dict=False)
    assert torch.equal(as_tuple[0], batch[:2])


def test_converted_once_then_read_from_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, pixels = encoder("blip-image-captioning-base")
    first = openvino_vision.compile_vision(model, 384, torch.float32, "f32")
    [folder] = [p for p in cache.iterdir() if p.name != "compiled"]
    assert (folder / "vision.xml").is_file()
    assert not list(cache.glob(".convert-*"))  # no half-written folder left

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(ov, "convert_model", refuse)
    with caplog.at_level(logging.INFO, logger="blipserve"):
        again = openvino_vision.compile_vision(model, 384, torch.float32, "f32")
    assert "OpenVINO IR from" in caplog.text
    assert torch.equal(
        again(pixel_values=pixels[:1]).last_hidden_state,
        first(pixel_values=pixels[:1]).last_hidden_state,
    )
    # Other weights are another model: a new key, never the cached one.
    before = openvino_vision.fingerprint(model, 384, ov.get_version())
    with torch.no_grad():
        cast(Any, model).post_layernorm.bias.add_(0.5)
    assert openvino_vision.fingerprint(model, 384, ov.get_version()) != before
    assert openvino_vision.fingerprint(model, 224, ov.get_version()) != before


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    int8, f32, bf16 = (
        Precision(torch.float32, int8=True),
        Precision(torch.float32),
        Precision(torch.bfloat16),
    )
    assert resolve_vision_backend("openvino", cpu, f32) == "openvino"
    assert resolve_vision_backend("openvino", cpu, int8) == "openvino"
    # auto: OpenVINO's int8 encoder where the CPU has VNNI (as measured: see its
    # docstring); torch otherwise
    monkeypatch.setattr(int8_linear, "cpu_has_vnni", lambda: False)
    assert resolve_vision_backend("auto", cpu, int8) == "torch"
    assert resolve_vision_backend("openvino", cpu, int8) == "openvino"  # (asked: given)
    monkeypatch.setattr(int8_linear, "cpu_has_vnni", lambda: True)
    assert resolve_vision_backend("auto", cpu, int8) == "openvino"
    assert resolve_vision_backend("auto", cpu, int8, when_auto=False) == "torch"
    assert resolve_vision_backend("auto", cpu, f32) == "torch"
    assert resolve_vision_backend("auto", cpu, bf16) == "torch"
    assert resolve_vision_backend("torch", cpu, int8) == "torch"
    assert resolve_vision_backend("auto", cuda, bf16) == "torch"
    with pytest.raises(ModelLoadError, match="runs on CPUs"):
        resolve_vision_backend("openvino", cuda, bf16)
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` fails: no int8 encoder
    assert resolve_vision_backend("auto", cpu, int8) == "torch"
    assert resolve_vision_backend("openvino", cpu, f32) == "openvino"
    with pytest.raises(ModelLoadError, match=r"nncf is not installed"):
        resolve_vision_backend("openvino", cpu, int8)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails
    assert resolve_vision_backend("auto", cpu, int8) == "torch"
    with pytest.raises(ModelLoadError, match=r"pip install 'blipserve\[openvino\]'"):
        resolve_vision_backend("openvino", cpu, f32)


def test_auto_falls_back_to_torch_when_the_encoder_does_not_convert(
    tiny_model_dir: dict[str, Path],
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--backend auto: a model OpenVINO cannot convert still loads, on torch, with a
    warning; --backend openvino says why it cannot."""

    def fail(*_: object, **__: object) -> None:
        raise RuntimeError("Model wasn't fully converted: aten::something_new\nmore detail")

    monkeypatch.setattr(ov, "convert_model", fail)
    monkeypatch.setattr(int8_linear, "cpu_has_vnni", lambda: True)  # (auto tries OpenVINO)
    cfg = ModelConfig(model=str(tiny_model_dir["blip-caption"]), device="cpu", dtype="int8")
    with caplog.at_level(logging.WARNING, logger="blipserve"):
        adapter = build_model(cfg)
    assert adapter.vision_backend == "torch"
    assert "vision encoder stays on torch: OpenVINO could not convert" in caplog.text
    assert "aten::something_new" in caplog.text
    assert "more detail" not in caplog.text
    with pytest.raises(ModelLoadError, match="OpenVINO could not convert the vision encoder"):
        build_model(dataclasses.replace(cfg, backend="openvino"))


@pytest.mark.parametrize("kind", ["blip-caption", "blip-vqa", "blip-itm", "blip2-opt", "blip2-t5"])
def test_adapters_run_on_it(tiny_model_dir: dict[str, Path], kind: str) -> None:
    """Each family's adapter with its vision encoder on OpenVINO says what torch says (in
    float32), and the torch encoder's weights are gone."""
    from blipserve.params import GenerationParams
    from blipserve.types import ModelInput

    images = [img.convert("RGB") for img in photos().values()][:3]
    text = {"blip-vqa": "what is it?", "blip-itm": "a photo"}.get(kind)
    items = [
        ModelInput(image=i, text=text, params=GenerationParams(max_new_tokens=5)) for i in images
    ]
    said = {}
    for backend in ("torch", "openvino"):
        cfg = ModelConfig(model=str(tiny_model_dir[kind]), device="cpu", dtype="float32")
        adapter = build_model(dataclasses.replace(cfg, backend=backend))
        said[backend] = [(p.text, p.score) for p in adapter.predict(items)]
        if backend == "openvino":
            vision = adapter.model.vision_model
            assert isinstance(vision, openvino_vision.OpenVinoVision)
            assert not list(vision.parameters())
            # OpenVINO takes every core per call: the engine runs one batch at a time
            assert adapter.vision_backend == "openvino"
            assert default_model_workers(torch.device("cpu"), 2, adapter.vision_backend) == 1
        else:
            assert adapter.vision_backend == "torch"
    assert [t for t, _ in said["openvino"]] == [t for t, _ in said["torch"]]


def test_each_family_names_its_int8_recipe(
    tiny_model_dir: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dtype int8 (auto on a CPU with VNNI): BLIP's encoder on OpenVINO in static int8;
    BLIP-2's stays on torch under --backend auto and takes dynamic int8 with --backend
    openvino (see the adapters for the measurements)."""
    pytest.importorskip("nncf", reason="no NNCF here")
    monkeypatch.setattr(int8_linear, "cpu_has_vnni", lambda: True)
    for kind in ("blip-caption", "blip-vqa", "blip-itm"):
        adapter = build_model(ModelConfig(model=str(tiny_model_dir[kind]), device="cpu"))
        assert adapter.vision_backend == "openvino"
        assert adapter.model.vision_model.precision == "int8-static"
    cfg = ModelConfig(model=str(tiny_model_dir["blip2-opt"]), device="cpu")
    assert build_model(cfg).vision_backend == "torch"
    adapter = build_model(dataclasses.replace(cfg, backend="openvino"))
    assert adapter.model.vision_model.precision == "int8-dynamic"


@pytest.fixture(
    scope="module",
    params=[
        ("blip-image-captioning-base", "int8-static"),
        ("blip-image-captioning-base", "int8-dynamic"),
        ("blip2-opt-2.7b", "int8-static"),
        ("blip2-opt-2.7b", "int8-dynamic"),
    ],
    ids="-".join,
)
def int8_encoder(
    request: pytest.FixtureRequest,
) -> tuple[Any, openvino_vision.OpenVinoVision, torch.Tensor]:
    """A random-weight encoder of each layout, its int8 compilation by each recipe and the
    photos' pixels."""
    pytest.importorskip("nncf", reason="no NNCF here")
    layout, mode = request.param
    model, processor = random_vision_encoder(layout)
    pixels = processor(images=list(photos().values()), return_tensors="pt")["pixel_values"]
    side = pixels.shape[-1]
    compiled = openvino_vision.compile_vision(
        model, side, torch.float32, mode, processor.image_processor
    )
    return model, compiled, pixels


def test_int8_features_stay_close_to_float32_on_photos(
    int8_encoder: tuple[Any, openvino_vision.OpenVinoVision, torch.Tensor],
) -> None:
    """Static (calibrated on generated images only) and dynamic int8 keep every
    photograph's features within the guard (cosine 0.999) of transformers' float32, and
    a batch equals its images one at a time, to the bit."""
    model, compiled, pixels = int8_encoder
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state
    got = compiled(pixel_values=pixels).last_hidden_state
    assert compiled.precision in ("int8-static", "int8-dynamic")
    assert cosine(got, want) >= 0.999
    one_by_one = torch.cat([compiled(pixel_values=p[None]).last_hidden_state for p in pixels])
    assert torch.equal(got, one_by_one)


def test_int8_quantized_once_then_read_from_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    nncf = pytest.importorskip("nncf", reason="no NNCF here")
    model, processor = random_vision_encoder("blip2-opt-2.7b")  # (2 layers: quick)
    pixels = processor(images=list(photos().values())[:2], return_tensors="pt")["pixel_values"]
    first = openvino_vision.compile_vision(
        model, 224, torch.float32, "int8-static", processor.image_processor
    )
    # NNCF's progress never reaches stdout, which is the CLI's output
    assert capfd.readouterr().out == ""
    folders = [p for p in cache.iterdir() if (p / "vision.xml").is_file()]
    assert len(folders) == 2  # the float conversion and the int8 model, each under its key
    quantized = [
        f
        for f in folders
        if any(
            op.get_type_name() == "FakeQuantize"
            for op in ov.Core().read_model(f / "vision.xml").get_ops()
        )
    ]
    assert len(quantized) == 1

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("quantized again")

    monkeypatch.setattr(nncf, "quantize", refuse)
    again = openvino_vision.compile_vision(
        model, 224, torch.float32, "int8-static", processor.image_processor
    )
    assert torch.equal(
        again(pixel_values=pixels).last_hidden_state, first(pixel_values=pixels).last_hidden_state
    )


def test_int8_without_nncf_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = random_vision_encoder("blip2-opt-2.7b")
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` fails
    with pytest.raises(ModelLoadError, match=r"nncf is not installed .*blipserve\[openvino\]"):
        openvino_vision.compile_vision(
            model, 224, torch.float32, "int8-dynamic", processor.image_processor
        )


def test_precision_follows_the_model_dtype() -> None:
    assert vision_precision(Precision(torch.float32)) == "f32"
    int8 = Precision(torch.float32, int8=True)
    assert vision_precision(int8) == "int8-static"
    assert vision_precision(int8, "int8-dynamic") == "int8-dynamic"
    native = "bf16" if cpu_has_native_bf16() else "f32"
    assert vision_precision(Precision(torch.bfloat16)) == native
    assert vision_precision(Precision(torch.float16)) == native


def test_calibration_images_are_fixed_and_of_both_kinds() -> None:
    import numpy as np

    from blipserve.models import calibration

    _, processor = random_vision_encoder("blip-image-captioning-base")
    first = calibration.calibration_pixels(processor.image_processor)
    again = calibration.calibration_pixels(processor.image_processor)
    assert len(first) == calibration.COUNT
    assert all(a.shape == (1, 3, 384, 384) and a.dtype == np.float32 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # noise has no two equal neighbours to speak of; shapes are mostly flat
    flat = [float((np.diff(a, axis=-1) == 0).mean()) for a in first]
    assert sum(f > 0.5 for f in flat) == calibration.COUNT // 2
    assert sum(f < 0.1 for f in flat) == calibration.COUNT // 2
