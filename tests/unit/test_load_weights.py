"""Loading for int8 (models/weights.py): the weights read in the checkpoint's own dtype,
quantized from there, what stays copied out in float32.  The same model as loading the
checkpoint in float32 first, without holding it in float32, and the file let go."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn
from transformers import Blip2ForConditionalGeneration

from blipserve.config import ModelConfig
from blipserve.engine import Engine
from blipserve.models import build_model
from blipserve.models.base import HFAdapter
from blipserve.models.int8_linear import Int8Linear
from blipserve.models.precision import Precision
from blipserve.models.weights import load_dtype, own_weights, stored_dtypes
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, RowInput
from helpers import client_base64, jpeg_bytes, photos


def _copy_in(folder: Path, dest: Path, dtype: torch.dtype) -> tuple[Path, Any]:
    """``folder``'s model saved again with its weights in ``dtype`` (as half-precision
    copies of the hub's float32 checkpoints are)."""
    from transformers import AutoConfig, AutoProcessor

    from blipserve.models.build import family_of

    cls = family_of(str(folder), AutoConfig.from_pretrained(folder)).model_class
    cls.from_pretrained(folder).to(dtype).save_pretrained(dest)
    AutoProcessor.from_pretrained(folder).save_pretrained(dest)
    assert any(dest.glob("*.safetensors"))
    return dest, cls


def _int8(
    folder: Path,
    pretrained: tuple[object, object] | None = None,
    kernel: Literal["auto", "fbgemm"] = "auto",
) -> HFAdapter:
    spec = ModelConfig(
        model=str(folder), device="cpu", dtype="int8", backend="torch", int8_kernel=kernel
    )
    adapter = build_model(spec, pretrained=pretrained)
    assert isinstance(adapter, HFAdapter)
    return adapter


def _mapped(folder: Path, collect: bool = True) -> list[str]:
    if collect:
        gc.collect()
    maps = Path("/proc/self/maps").read_text()
    return [line for line in maps.splitlines() if str(folder) in line]


@pytest.mark.parametrize(
    ("kind", "dtype"), [("blip-caption", torch.bfloat16), ("blip2-opt", torch.float16)]
)
def test_int8_from_a_half_precision_checkpoint_is_int8_from_its_float32_copy(
    tiny_model_dir: Mapping[str, Path], tmp_path: Path, kind: str, dtype: torch.dtype
) -> None:
    from transformers import AutoProcessor

    folder, cls = _copy_in(tiny_model_dir[kind], tmp_path / "half", dtype)
    direct = _int8(folder)
    # (float32, but for layers kept in bf16 on purpose: AMX image keys and values)
    bf16 = {name for name, m in direct.model.named_modules() if getattr(m, "keeps_dtype", 0)}
    floats = {
        t.dtype
        for key, t in direct.model.state_dict().items()
        if t.is_floating_point() and key.rpartition(".")[0] not in bf16
    }
    assert floats == {torch.float32}
    narrow = {
        t.dtype for key, t in direct.model.state_dict().items() if key.rpartition(".")[0] in bf16
    }
    assert narrow <= {torch.bfloat16}
    assert any(isinstance(m, Int8Linear) for m in direct.model.modules())
    # as blipserve loaded int8 before: the whole checkpoint in float32, then quantized
    float32 = cls.from_pretrained(folder, dtype=torch.float32).eval()
    before = _int8(folder, pretrained=(float32, AutoProcessor.from_pretrained(folder)))
    want, got = before.model.state_dict(), direct.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[key], got[key]) for key in want)
    # and the int8 layers' packed weights, which are not in a state dict
    packs = dict(_packs(before.model))
    assert packs
    assert packs.keys() == dict(_packs(direct.model)).keys()
    for name, pack in _packs(direct.model):
        assert all(torch.equal(a, b) for a, b in zip(pack, packs[name], strict=True)), name
    # the configuration says what the model computes in, whatever the file held
    configs = [m.config for m in direct.model.modules() if hasattr(m, "config")]
    assert {c.dtype for c in configs} == {torch.float32}
    images = list(photos().values())[:3]
    rows = [RowInput(i, client_base64(jpeg_bytes(image))) for i, image in enumerate(images)]
    with Engine(before) as engine:
        expected = engine.predict(rows)
    with Engine(direct) as engine:
        assert engine.predict(rows) == expected


def _packs(model: nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
    """Each int8 layer's packed weights (blipserve's kernel's, or fbgemm's unpacked)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            if module._kernel is not None:
                k = module._kernel
                tensors = [k.weight, k.scale, k.zero_sums, *([] if k.bias is None else [k.bias])]
            else:
                weight, bias = torch.ops.quantized.linear_unpack(module._packed)
                tensors = [weight.int_repr(), weight.q_per_channel_scales()]
                tensors += [] if bias is None else [bias]
            out.append((name, tensors))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize(
    ("kind", "kernel"),
    # (fbgemm: its packed layers keep the bias they are given, once a view of the file)
    [("blip-caption", "auto"), ("blip2-opt", "auto"), ("blip2-opt", "fbgemm")],
)
def test_an_int8_build_lets_the_checkpoint_file_go(
    tiny_model_dir: Mapping[str, Path], tmp_path: Path, kind: str, kernel: Literal["auto", "fbgemm"]
) -> None:
    # float32 on disk: loaded as views of the file, which the weights that stay (the
    # embeddings, the norms) kept mapped, with every page read while quantizing
    folder, cls = _copy_in(tiny_model_dir[kind], tmp_path / "f32", torch.float32)
    held = cls.from_pretrained(folder, dtype="auto")
    assert _mapped(folder), "transformers no longer maps checkpoints: revisit models/weights.py"
    del held
    assert not _mapped(folder)
    adapter = _int8(folder, kernel=kernel)
    # let go by the build itself (BLIP's replaced layers sit in reference cycles)
    assert not _mapped(folder, collect=False)
    assert any(isinstance(m, Int8Linear) for m in adapter.model.modules())


def test_own_weights_copies_every_tensor_once_and_keeps_ties() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10), nn.BatchNorm1d(10))
    model[1].weight = model[0].weight  # tied, as an LM head and its embeddings are
    model.half()
    model[1].bias.requires_grad_(False)
    old = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}
    copied = own_weights(model, torch.float32)
    state = model.state_dict(keep_vars=True)
    assert model[1].weight is model[0].weight
    assert isinstance(model[0].weight, nn.Parameter)
    assert not model[1].bias.requires_grad
    assert model[0].weight.requires_grad
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
            assert tensor.data_ptr() != old[name], name
        else:  # (BatchNorm's step counter)
            assert tensor.dtype == torch.long
            assert tensor.data_ptr() == old[name]
    assert copied == 4 * (10 * 4 + 10 + 10 * 4)  # the tied weight once; bias, BN's 4 rows


def test_a_checkpoint_of_mixed_dtypes_loads_in_float32(
    tiny_model_dir: Mapping[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoProcessor

    folder = tiny_model_dir["blip2-opt"]
    model = Blip2ForConditionalGeneration.from_pretrained(folder).to(torch.bfloat16)
    model.qformer.float()  # (kept wider than the rest: rounding it to bfloat16 would lose)
    model.save_pretrained(tmp_path / "mixed")
    AutoProcessor.from_pretrained(folder).save_pretrained(tmp_path / "mixed")
    int8 = Precision(torch.float32, int8=True)
    assert stored_dtypes(str(tmp_path / "mixed")) == {torch.bfloat16, torch.float32}
    assert load_dtype(int8, str(tmp_path / "mixed")) == torch.float32
    half, _ = _copy_in(folder, tmp_path / "half", torch.float16)
    assert load_dtype(int8, str(half)) == torch.float16
    assert load_dtype(Precision(torch.bfloat16), str(half)) == torch.bfloat16
    # not on disk here (a hub id not in the cache): float32, as before
    assert stored_dtypes("nobody/nothing") == set()
    assert load_dtype(int8, "nobody/nothing") == torch.float32
    # the mixed one builds, its Q-Former's float32 weights quantized as they were stored
    adapter = _int8(tmp_path / "mixed")
    assert any(isinstance(m, Int8Linear) for m in adapter.model.qformer.modules())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amx_vision_from_a_half_precision_checkpoint(
    tiny_model_dir: Mapping[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
) -> None:
    # as on a CPU with AMX: the vision encoder in bf16 holds memory of its own (a bf16
    # file's tensors are not views of the file any longer) and answers in float32, what
    # the rest of the int8 model computes in, not in the file's dtype
    from blipserve.models import base

    monkeypatch.setattr(base, "amx_bf16", lambda device: True)
    folder, _ = _copy_in(tiny_model_dir["blip2-opt"], tmp_path / "half", dtype)
    adapter = _int8(folder)
    assert next(s for s in adapter.build if s.name.startswith("AMX vision")).applied
    assert not _mapped(folder, collect=False)
    vision = adapter.model.vision_model
    assert {p.dtype for p in vision.parameters()} == {torch.bfloat16}
    items = [ModelInput(image, None, GenerationParams()) for image in list(photos().values())[:2]]
    with torch.inference_mode():
        out = vision(pixel_values=adapter.pixel_values(items))
    assert out.last_hidden_state.dtype == out.pooler_output.dtype == torch.float32
