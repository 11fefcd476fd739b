"""build_model: the declared steps of a build, applied in order and reported; the lean BLIP
text layers proven on the live model against transformers' own, or left out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional

from blipserve.config import ModelConfig
from blipserve.engine import Engine
from blipserve.errors import ModelLoadError
from blipserve.models import build_model, lean_text, openvino_vision
from blipserve.models.base import HFAdapter
from blipserve.models.lean_text_check import LAYER_PARAMETERS, lean_text_refusal
from blipserve.models.precision import amx_bf16, cpu_has_native_bf16
from blipserve.params import GenerationParams
from blipserve.types import ModelInput, Prediction, RowInput
from helpers import client_base64, jpeg_bytes, photos


def _built(folder: Path, **spec: Any) -> HFAdapter:
    adapter = build_model(ModelConfig(model=str(folder), device="cpu", **spec))
    assert isinstance(adapter, HFAdapter)
    return adapter


def _steps(adapter: HFAdapter) -> list[tuple[str, bool]]:
    return [(step.name, step.applied) for step in adapter.build]


def test_int8_steps_in_order_with_their_kernels(tiny_model_dir: Mapping[str, Path]) -> None:
    adapter = _built(tiny_model_dir["blip-caption"], dtype="int8", backend="torch")
    names = [name for name, applied in _steps(adapter) if applied]
    assert names[:2] == ["keep freed memory", "lean text layers"]
    # the vision encoder and the image's keys and values: in bf16 where AMX runs it, else
    # in int8
    amx = "AMX" if amx_bf16(torch.device("cpu")) else "int8"
    vision = names.index(f"{amx} vision encoder (one image a call)")
    assert names[vision : vision + 3] == [
        f"{amx} vision encoder (one image a call)",
        f"{amx} image keys and values",
        "int8 linears",
    ]
    assert ("bf16 image keys and values" in names) == cpu_has_native_bf16()
    kernels = {
        step.runs_on for step in adapter.build if step.name.startswith("int8") and step.applied
    }
    assert len(kernels) == 1
    assert kernels <= {"blipserve's int8 kernel (AVX-512 VNNI)", "torch's fbgemm int8 kernel"}
    assert adapter.build[0].runs_on == "glibc"


@pytest.mark.parametrize("kind", ["blip-caption", "blip-vqa", "blip-itm"])
def test_the_lean_layers_compute_what_transformers_layers_compute(
    tiny_model_dir: Mapping[str, Path], kind: str
) -> None:
    # Fails when a transformers release changes BlipTextLayer's signature, its cache or its
    # arithmetic: then every build would fall back (below), and this says so first.
    import inspect

    from transformers.models.blip.modeling_blip_text import BlipTextLayer

    assert tuple(inspect.signature(BlipTextLayer.forward).parameters) == LAYER_PARAMETERS
    from transformers import AutoConfig

    from blipserve.models.build import family_of

    folder = tiny_model_dir[kind]
    family = family_of(kind, AutoConfig.from_pretrained(folder))
    assert lean_text_refusal(family.model_class.from_pretrained(folder)) is None
    assert ("lean text layers", True) in _steps(_built(folder, dtype="float32"))


@pytest.fixture
def rows() -> list[RowInput]:
    images = list(photos().values())[:3]
    return [RowInput(i, client_base64(jpeg_bytes(image))) for i, image in enumerate(images)]


def test_a_lean_layer_that_computes_otherwise_is_left_out(
    tiny_model_dir: Mapping[str, Path],
    rows: list[RowInput],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tiny_model_dir["blip-caption"]
    with Engine(_built(folder, dtype="float32")) as engine:
        want = engine.predict(rows)
    attend = lean_text._attend

    def maskless(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        return attend(q, k, v, None)  # a causal decoder that sees the future

    monkeypatch.setattr(lean_text, "_attend", maskless)
    with caplog.at_level(logging.WARNING, logger="blipserve.models.optimize"):
        adapter = _built(folder, dtype="int8", backend="torch")
    lean = next(step for step in adapter.build if step.name == "lean text layers")
    assert not lean.applied
    assert "differs from transformers'" in lean.why
    assert "lean text layers: skipped (prompt: lean layer differs" in caplog.text
    keys_values = next(s for s in adapter.build if s.name == "int8 image keys and values")
    assert not keys_values.applied
    assert keys_values.why == "needs lean text layers, which was skipped"
    # transformers' layers serve instead, and say what they said before
    float32 = _built(folder, dtype="float32")
    assert ("lean text layers", False) in _steps(float32)
    with Engine(float32) as engine:
        got = engine.predict(rows)
    assert all(isinstance(p, Prediction) for p in got)
    assert got == want


def test_an_uncached_call_that_computes_otherwise_is_caught(
    tiny_model_dir: Mapping[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the ITM head and VQA's question encoder call the layers without a cache
    layer = lean_text._lean_text_layer

    def blind_without_cache(module: Any, hidden: Any, image: Any = None, *a: Any, **k: Any) -> Any:
        return layer(module, hidden, image if k.get("cache") is not None else None, *a, **k)

    monkeypatch.setattr(lean_text, "_lean_text_layer", blind_without_cache)
    itm = _built(tiny_model_dir["blip-itm"], dtype="float32")
    lean = next(step for step in itm.build if step.name == "lean text layers")
    assert not lean.applied
    assert lean.why.startswith("uncached text: lean layer differs"), lean.why


def test_the_check_leaves_torch_s_random_state_as_it_was(
    tiny_model_dir: Mapping[str, Path],
) -> None:
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(tiny_model_dir["blip-caption"])
    before = torch.get_rng_state()
    assert lean_text_refusal(model) is None
    assert torch.equal(torch.get_rng_state(), before)


def test_a_changed_layer_signature_is_refused(
    tiny_model_dir: Mapping[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.models.blip.modeling_blip_text import BlipTextLayer

    forward = BlipTextLayer.forward

    def renamed(self: Any, hidden_states: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        return forward(self, hidden_states, **kwargs)

    monkeypatch.setattr(BlipTextLayer, "forward", renamed)
    adapter = _built(tiny_model_dir["blip-caption"], dtype="float32")
    lean = next(step for step in adapter.build if step.name == "lean text layers")
    assert not lean.applied
    assert "BlipTextLayer.forward takes" in lean.why


def test_the_build_is_logged_step_by_step(
    tiny_model_dir: Mapping[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="blipserve.models.build"):
        _built(tiny_model_dir["blip2-opt"], dtype="float32")
    assert "build step: keep freed memory on glibc" in caplog.text


def test_a_static_cache_is_a_second_adapter_over_the_same_model(
    tiny_model_dir: Mapping[str, Path],
) -> None:
    adapter = _built(tiny_model_dir["blip-caption"], dtype="float32")
    static = adapter.with_static_cache()
    assert (adapter.static_cache, static.static_cache) == (False, True)
    assert static.model is adapter.model
    assert static.build == adapter.build


def test_vision_attention_is_a_spec_option_of_blip_models(
    tiny_model_dir: Mapping[str, Path],
) -> None:
    eager = _built(tiny_model_dir["blip-caption"], dtype="float32", vision_attention="eager")
    assert not any("vision attention" in name for name, _ in _steps(eager))
    bf16 = _built(tiny_model_dir["blip-caption"], dtype="float32", vision_attention="bf16")
    assert ("bf16 vision attention", True) in _steps(bf16)
    with pytest.raises(ModelLoadError, match=r"--vision-attention: .* BLIP models' vision"):
        _built(tiny_model_dir["blip2-opt"], dtype="float32", vision_attention="sdpa")


def test_a_static_cache_is_refused_where_the_family_has_none(
    tiny_model_dir: Mapping[str, Path],
) -> None:
    vqa = _built(tiny_model_dir["blip-vqa"], dtype="float32")
    with pytest.raises(ModelLoadError, match=r"a static KV cache: .* does not support it"):
        vqa.with_static_cache()
    assert vqa.with_static_cache(False).static_cache is False


@pytest.mark.parametrize(
    "narrow", [lean_text.keep_image_keys_values_in, lean_text.project_image_keys_values_in_bf16]
)
def test_image_keys_values_in_bf16_stay_close_to_float32(
    tiny_model_dir: Mapping[str, Path], narrow: Callable[[Any], int]
) -> None:
    # the int8 mode's steps on CPUs with native bf16 (kept in bf16) and with AMX (projected
    # in bf16 too), here on any CPU: a decoding step's hidden states within bfloat16's
    # rounding of float32's, batched as one by one
    from transformers import BlipForConditionalGeneration

    folder = tiny_model_dir["blip-caption"]
    f32 = BlipForConditionalGeneration.from_pretrained(folder).eval()
    lean_text.lean_text_layers(f32)
    bf16 = BlipForConditionalGeneration.from_pretrained(folder).eval()
    lean_text.lean_text_layers(bf16)
    assert narrow(bf16) == f32.config.text_config.num_hidden_layers
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = f32.generate(
            pixel_values=pixels, max_new_tokens=6, output_logits=True, return_dict_in_generate=True
        )
        got = bf16.generate(
            pixel_values=pixels, max_new_tokens=6, output_logits=True, return_dict_in_generate=True
        )
        alone = bf16.generate(pixel_values=pixels[1:2], max_new_tokens=6)
    first = (want.logits[0], got.logits[0])  # (3, V) the first step's, from the same prompt
    torch.testing.assert_close(first[1], first[0], rtol=2e-2, atol=2e-2)
    assert torch.equal(alone[0], got.sequences[1, : alone.shape[1]])


def test_a_speedup_can_be_left_out_by_name(tiny_model_dir: Mapping[str, Path]) -> None:
    folder = tiny_model_dir["blip-caption"]
    adapter = _built(folder, dtype="float32", disable_speedup=("lean text layers",))
    lean = next(step for step in adapter.build if step.name == "lean text layers")
    assert (lean.applied, lean.why) == (False, "--disable-speedup")
    with pytest.raises(ModelLoadError, match=r"no speed option named 'warp drive' here or on"):
        _built(folder, dtype="float32", disable_speedup=("warp drive",))


def test_a_speedup_this_host_lacks_is_a_warning_when_left_out(
    tiny_model_dir: Mapping[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # settings shared by a fleet of CPUs: an option only AMX hosts (or int8) get, named on
    # a float32 model, leaves out nothing and says so instead of refusing to start
    folder = tiny_model_dir["blip-caption"]
    names = ("AMX vision encoder (one image a call)", "int8 linears", "lean text layers")
    with caplog.at_level(logging.WARNING, logger="blipserve.models.build"):
        adapter = _built(folder, dtype="float32", disable_speedup=names)
    assert [step.name for step in adapter.build if not step.applied] == ["lean text layers"]
    for name in names[:2]:
        assert f"--disable-speedup {name!r}: model" in caplog.text
    assert "does not get that option on this host in float32" in caplog.text


def test_amx_image_keys_values_replace_the_int8_ones_and_stay_bf16(
    tiny_model_dir: Mapping[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a CPU with AMX (bf16 runs on any CPU, slowly): the projections stay in bf16
    # through the build (its last step copies what was not quantized into float32), the
    # int8 step says why it was skipped, and leaving the AMX step out brings it back
    from blipserve.models import blip

    monkeypatch.setattr(blip, "cpu_has_native_bf16", lambda: True)  # (AMX has it)
    monkeypatch.setattr(blip, "amx_bf16", lambda device: True)
    folder = tiny_model_dir["blip-caption"]
    adapter = _built(folder, dtype="int8", backend="torch")
    steps = {step.name: step for step in adapter.build}
    assert steps["AMX image keys and values"].applied
    int8 = steps["int8 image keys and values"]
    assert (int8.applied, int8.why) == (False, "replaced by AMX image keys and values")
    layers = adapter.model.text_decoder.bert.encoder.layer
    assert all(type(layer.crossattention.self.kv) is lean_text.Bf16Linear for layer in layers)
    assert {layer.crossattention.self.kv.weight.dtype for layer in layers} == {torch.bfloat16}
    without = _built(
        folder, dtype="int8", backend="torch", disable_speedup=("AMX image keys and values",)
    )
    assert next(s for s in without.build if s.name == "int8 image keys and values").applied
    kv = without.model.text_decoder.bert.encoder.layer[0].crossattention.self.kv
    assert type(kv).__name__ == "Int8Linear"
    # where the keys and values are kept stays the bf16 step's to say: left out, float32
    kept = _built(
        folder, dtype="int8", backend="torch", disable_speedup=("bf16 image keys and values",)
    )
    for model, dtype in ((adapter.model, torch.bfloat16), (kept.model, torch.float32)):
        cross = model.text_decoder.bert.encoder.layer[0].crossattention.self
        assert type(cross.kv) is lean_text.Bf16Linear
        states = torch.randn(2, 5, cross.kv.in_features)
        with torch.inference_mode():
            keys, values = lean_text._image_keys_values(cross, states, cross.attention_head_size)
        assert (keys.dtype, values.dtype) == (dtype, dtype)


def test_amx_vision_encoder_runs_in_bf16_one_image_a_call(
    tiny_model_dir: Mapping[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a CPU with AMX (bf16 runs on any CPU, slowly): the vision encoder's weights stay
    # in bf16 through the build (not quantized, not copied back to float32), it answers in
    # float32 close to float32's, an image's features do not depend on its batch, and
    # leaving the step out brings the int8 encoder back
    from blipserve.models import base

    monkeypatch.setattr(base, "amx_bf16", lambda device: True)
    folder = tiny_model_dir["blip2-opt"]
    adapter = _built(folder, dtype="int8", backend="torch")
    steps = {step.name: step for step in adapter.build}
    amx = "AMX vision encoder (one image a call)"
    assert steps[amx].applied
    int8 = steps["int8 vision encoder (one image a call)"]
    assert (int8.applied, int8.why) == (False, f"replaced by {amx}")
    vision = adapter.model.vision_model
    assert {p.dtype for p in vision.parameters()} == {torch.bfloat16}
    assert any(type(m) is torch.nn.Linear for m in vision.modules())
    items = [ModelInput(image, None, GenerationParams()) for image in list(photos().values())[:3]]
    pixels = adapter.pixel_values(items)  # (3, 3, S, S) float32
    reference = _built(folder, dtype="float32").model.vision_model
    with torch.inference_mode():
        batched = vision(pixel_values=pixels).last_hidden_state
        alone = [vision(pixel_values=p[None]).last_hidden_state for p in pixels]
        want = reference(pixel_values=pixels).last_hidden_state
    assert batched.dtype == torch.float32
    assert torch.equal(batched, torch.cat(alone))
    cosine = functional.cosine_similarity(batched.flatten(1), want.flatten(1))
    assert float(cosine.min()) > 0.999
    assert not torch.equal(batched, want)  # (bf16's rounding: computed, not copied)
    without = _built(folder, dtype="int8", backend="torch", disable_speedup=(amx,))
    assert next(s for s in without.build if s.name == int8.name).applied
    layer = without.model.vision_model.encoder.layers[0].mlp.fc1
    assert type(layer).__name__ == "Int8Linear"


def test_vision_steps_are_skipped_where_openvino_runs_the_encoder(
    tiny_model_dir: Mapping[str, Path],
) -> None:
    why = openvino_vision.unavailable(torch.device("cpu")) or openvino_vision.int8_unavailable()
    if why is not None:
        pytest.skip(why)
    adapter = _built(tiny_model_dir["blip-caption"], dtype="int8", backend="openvino")
    vision_steps = [s for s in adapter.build if "vision" in s.name and "OpenVINO" not in s.name]
    assert vision_steps  # (the attention and int8 or AMX encoder steps)
    for step in vision_steps:
        assert (step.applied, step.why) == (False, "the vision encoder runs on OpenVINO")
