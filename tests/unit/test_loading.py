"""Loading through the real path: folders, hub ids offline, registry, device and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blipserve.config import Int8Kernel, ModelConfig
from blipserve.errors import ModelLoadError
from blipserve.models import ADAPTERS, build_model, int8_kernel, int8_linear, lean_text
from blipserve.models.precision import amx_bf16, cpu_has_native_bf16, resolve_precision

EXPECTED_KIND = {
    "blip-caption": "blip-caption",
    "blip-vqa": "blip-vqa",
    "blip-itm": "blip-itm",
    "blip2-opt": "blip2",
    "blip2-t5": "blip2",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_KIND))
def test_architecture_maps_to_adapter(tiny_model_dir: dict[str, Path], kind: str) -> None:
    adapter = build_model(ModelConfig(model=str(tiny_model_dir[kind])))
    assert adapter.kind == EXPECTED_KIND[kind]
    assert adapter.image_size == 32
    assert adapter.device == torch.device("cpu")
    # auto on CPU: int8 where torch has the int8 kernels; else bfloat16 where the CPU has
    # native bf16, float32 elsewhere
    if int8_linear.int8_available() is None:
        assert str(adapter.precision) == "int8"
        assert adapter.dtype == torch.float32
        # every Linear is an Int8Linear, but on AMX the vision encoder's where torch runs it
        # and BLIP's image key/value projections: those stay in bfloat16
        amx = amx_bf16(torch.device("cpu"))
        vision = adapter.model.vision_model
        on_torch = any(True for _ in vision.parameters())
        in_vision = [m for m in vision.modules() if isinstance(m, torch.nn.Linear)]
        assert bool(in_vision) == (amx and on_torch)
        linears = [m for m in adapter.model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(m.weight.dtype == torch.bfloat16 for m in linears)
        image_keys = [m for m in linears if isinstance(m, lean_text.Bf16Linear)]
        assert bool(image_keys) == (amx and adapter.kind.startswith("blip-"))
        assert len(linears) == len(in_vision) + len(image_keys)
    else:
        assert adapter.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    rest = (p for name, p in adapter.model.named_parameters() if "vision_model" not in name)
    assert next(rest).dtype == adapter.dtype
    assert not adapter.model.training


def test_registry_covers_the_published_architectures() -> None:
    layouts = Path(__file__).parents[1] / "data" / "hf-layouts"
    for config in layouts.glob("*/config.json"):
        for arch in json.loads(config.read_text())["architectures"]:
            assert arch in ADAPTERS


def test_float32_on_request(tiny_model_dir: dict[str, Path]) -> None:
    adapter = build_model(ModelConfig(model=str(tiny_model_dir["blip-caption"]), dtype="float32"))
    assert next(adapter.model.parameters()).dtype == torch.float32


def test_bfloat16_weights(tiny_model_dir: dict[str, Path]) -> None:
    adapter = build_model(ModelConfig(model=str(tiny_model_dir["blip-caption"]), dtype="bfloat16"))
    assert adapter.dtype == torch.bfloat16
    assert next(adapter.model.parameters()).dtype == torch.bfloat16


def test_int8_on_request(tiny_model_dir: dict[str, Path]) -> None:
    if int8_linear.int8_available() is not None:
        with pytest.raises(ModelLoadError, match="int8 is not available"):
            build_model(ModelConfig(model=str(tiny_model_dir["blip-caption"]), dtype="int8"))
        return
    adapter = build_model(ModelConfig(model=str(tiny_model_dir["blip-caption"]), dtype="int8"))
    assert adapter.precision.int8
    assert any(isinstance(m, int8_linear.Int8Linear) for m in adapter.model.modules())


@pytest.mark.parametrize("kernel", ["auto", "fbgemm"])
def test_int8_kernel_on_request(tiny_model_dir: dict[str, Path], kernel: Int8Kernel) -> None:
    if int8_linear.int8_available() is not None:
        pytest.skip(str(int8_linear.int8_available()))
    cfg = ModelConfig(model=str(tiny_model_dir["blip-caption"]), dtype="int8", int8_kernel=kernel)
    adapter = build_model(cfg)
    ours = kernel == "auto" and int8_kernel.load() is not None
    assert adapter.precision.int8_kernel == ("blipserve" if ours else "fbgemm")
    layers = [m for m in adapter.model.modules() if isinstance(m, int8_linear.Int8Linear)]
    assert layers
    assert all((m._kernel is not None) is ours for m in layers)


def test_int8_is_refused_on_a_gpu(tiny_model_dir: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="CPUs only"):
        resolve_precision("int8", torch.device("cuda"))


def test_unknown_architecture(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        build_model(ModelConfig(model=str(tmp_path)))
    assert "BertForMaskedLM, which blipserve does not serve" in info.value.message
    assert "BlipForConditionalGeneration" in info.value.message


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        build_model(ModelConfig(model=str(tmp_path)))


def test_missing_folder() -> None:
    with pytest.raises(ModelLoadError, match="no such folder"):
        build_model(ModelConfig(model="./no/such/model/folder"))


def test_unreachable_hub_id_offline() -> None:
    with pytest.raises(ModelLoadError) as info:
        build_model(ModelConfig(model="Salesforce/blipserve-no-such-model"))
    message = info.value.message
    assert "'Salesforce/blipserve-no-such-model' is not a local folder" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local save_pretrained folder" in message


def test_folder_with_missing_weights(tiny_model_dir: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_model_dir["blip-caption"]
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="could not be loaded as blip-caption"):
        build_model(ModelConfig(model=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(tiny_model_dir: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        build_model(ModelConfig(model=str(tiny_model_dir["blip-caption"]), device="cuda"))
