"""Pixel values made with torch (:mod:`blipserve.models.pixels`, what a GPU model uses), run
here on the CPU: within one 8-bit level of the processor's on photographs, and the demo
model's captions unchanged on 640x480 JPEGs."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL.Image import Resampling

from blipserve.config import EngineConfig, ModelConfig
from blipserve.engine import Engine
from blipserve.errors import ModelLoadError
from blipserve.finetune.scenes import HELDOUT_SEED, generate
from blipserve.models.base import HFAdapter
from blipserve.models.pixels import DevicePixels
from blipserve.types import Prediction, RowInput
from helpers import jpeg_bytes, photos

BICUBIC = Resampling.BICUBIC
LAYOUTS = Path(__file__).parents[1] / "data" / "hf-layouts"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image_processor() -> object:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(LAYOUTS / "blip-image-captioning-base")
    return processor.image_processor


@pytest.mark.parametrize("name", list(photos()))
def test_within_one_level_of_the_processor_on_photographs(
    image_processor: object, name: str
) -> None:
    image = photos()[name].convert("RGB")
    pixels = DevicePixels.of(image_processor, CPU)
    assert pixels is not None
    assert pixels.size == (384, 384)
    want = image_processor(images=[image], return_tensors="pt")["pixel_values"]  # type: ignore[operator]
    got = pixels([image], torch.float32)
    assert got.shape == want.shape == (1, 3, 384, 384)
    levels = (got - want).abs() * pixels.std / pixels.scale  # in 8-bit levels
    assert levels.max() <= 1.0 + 1e-3
    assert (levels > 0.5).float().mean() < 0.005  # PIL's fixed-point rounding, rarely


def test_model_dtype_and_batch(image_processor: object) -> None:
    pixels = DevicePixels.of(image_processor, CPU)
    assert pixels is not None
    images = [photos()["chelsea"], photos()["coffee"].convert("L")]  # a greyscale one too
    both = pixels(images, torch.bfloat16)
    assert both.dtype == torch.bfloat16
    assert both.shape == (2, 3, 384, 384)
    assert torch.equal(both[1:], pixels(images[1:], torch.bfloat16))


@pytest.mark.parametrize(
    "change",
    [{"resample": 1}, {"do_normalize": False}, {"do_center_crop": True}, {"size": {}}],
)
def test_processors_doing_something_else_keep_their_own_code(
    image_processor: object, change: dict[str, object]
) -> None:
    from transformers import AutoProcessor

    other = AutoProcessor.from_pretrained(LAYOUTS / "blip-image-captioning-base").image_processor
    for key, value in change.items():
        setattr(other, key, value)
    assert DevicePixels.of(other, CPU) is None


def load_demo(image_resize: str) -> Engine:
    model = ModelConfig(
        model="demo",
        device="cpu",
        dtype="float32",
        backend="torch",
        image_resize=image_resize,  # type: ignore[arg-type]
    )
    return Engine.load(model, config=EngineConfig(max_batch_size=16))


@pytest.fixture(scope="module")
def demos() -> Iterator[dict[str, Engine]]:
    engines = {how: load_demo(how) for how in ("auto", "device")}
    yield engines
    for engine in engines.values():
        engine.close()


def test_demo_captions_unchanged_on_640x480_jpegs(demos: dict[str, Engine]) -> None:
    # The demo model's 64x64 scenes as a camera folder would hold them: 640x480 JPEGs,
    # which both paths shrink back to 64x64 (so resampling is really exercised).
    scenes = list(generate(HELDOUT_SEED, 100, start=7_000))
    rows = [
        RowInput(i, base64.b64encode(jpeg_bytes(s.image.resize((640, 480), BICUBIC))).decode())
        for i, s in enumerate(scenes)
    ]
    auto, device = demos["auto"].adapter, demos["device"].adapter
    assert isinstance(auto, HFAdapter)
    assert isinstance(device, HFAdapter)
    assert auto.device_pixels is None  # on a CPU, auto keeps the processor's code
    assert device.device_pixels is not None
    plain, tensors = demos["auto"].predict(rows), demos["device"].predict(rows)
    said = [p.text for p in plain if isinstance(p, Prediction)]
    assert len(said) == len(scenes)
    same = sum(a == b for a, b in zip(plain, tensors, strict=True)) / len(scenes)
    assert same >= 0.99, [(a, b) for a, b in zip(plain, tensors, strict=True) if a != b]
    right = sum(text == s.caption for text, s in zip(said, scenes, strict=True)) / len(scenes)
    assert right >= 0.9  # (the scenes survive the round trip: the comparison means something)


def test_device_resize_is_refused_where_the_processor_does_more(tmp_path: Path) -> None:
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from blipserve.models import build_model, builtin_path

    demo = builtin_path("demo")
    processor = AutoProcessor.from_pretrained(demo)
    processor.image_processor.resample = 1  # Lanczos: more than DevicePixels does
    model = BlipForConditionalGeneration.from_pretrained(demo)
    spec = ModelConfig(model="demo", device="cpu", dtype="float32", image_resize="device")
    with pytest.raises(ModelLoadError, match="--image-resize processor"):
        build_model(spec, pretrained=(model, processor))
    # auto (on a GPU): the processor stays, and the build says why
    from blipserve.models import build
    from blipserve.models.optimize import BuildStep

    steps: list[BuildStep] = []
    auto = dataclasses.replace(spec, image_resize="auto")
    assert build._device_pixels(auto, processor, torch.device("cuda"), steps) is None
    assert not steps[0].applied
    assert "does more than a fixed-size bilinear or bicubic resize" in steps[0].why
