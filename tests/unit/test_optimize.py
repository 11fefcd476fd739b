"""Speed options: int8 linears (accurate, batch-invariant), SDPA attention, per-image vision,
and which of them each family declares."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BlipVisionConfig, BlipVisionModel

from blipserve.models import (
    ADAPTERS,
    base,
    blip,
    blip2_itm,
    int8_kernel,
    int8_linear,
    lean_text,
    optimize,
    vision_encoder,
)
from blipserve.models.base import HFAdapter
from blipserve.models.blip import BlipCaptionAdapter, BlipMatchAdapter, BlipVqaAdapter
from blipserve.models.blip2 import Blip2Adapter
from blipserve.models.precision import Precision, cpu_has_native_bf16

needs_int8 = pytest.mark.skipif(
    int8_linear.int8_available() is not None, reason=str(int8_linear.int8_available())
)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


@pytest.fixture(params=["kernel", "fbgemm"])
def backend(request: pytest.FixtureRequest) -> str:
    """Whose int8 kernel the test's layers use: blipserve's or torch's fbgemm."""
    if request.param == "kernel" and int8_kernel.load() is None:
        pytest.skip(f"blipserve's int8 kernel: {int8_kernel.unavailable()}")
    return str(request.param)


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(96, 40)


@needs_int8
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_close_to_float(bias: bool, per_row: bool, backend: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(96, 40, bias=bias)
    if bias:
        nn.init.uniform_(layer.bias, 0.5, 1.0)  # large enough that dropping it would show
    x = torch.randn(3, 7, 96)
    want = layer(x)
    got = int8_linear.Int8Linear(layer, per_row=per_row, kernel=backend == "kernel")(x)
    assert got.shape == want.shape == (3, 7, 40)
    assert relative_error(got, want) < 0.02


@needs_int8
@pytest.mark.parametrize("per_row", [True, False])
def test_int8_linear_keeps_the_input_dtype(linear: nn.Linear, per_row: bool, backend: str) -> None:
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    got = int8_linear.Int8Linear(linear, per_row=per_row, kernel=backend == "kernel")(x)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, linear(x.float())) < 0.03


@needs_int8
def test_int8_rows_do_not_depend_on_their_batch(linear: nn.Linear, backend: str) -> None:
    # fbgemm picks one activation scale per call; the +1/-1 columns make it the same for
    # any batch (blipserve's kernel scales each row itself), so each row's output is
    # bit-identical alone and in company — including a companion row 1000x larger.
    int8 = int8_linear.Int8Linear(linear, kernel=backend == "kernel")
    torch.manual_seed(1)
    rows = torch.randn(2, 300, 96)
    rows[0, 3] *= 1000.0
    rows[0, 5] = 0.0
    together = int8(rows)  # (2, 300, 40)
    alone = torch.cat([int8(row[None]) for row in rows[0, :8]])
    assert torch.equal(together[0, :8], alone)
    assert torch.equal(together[1], int8(rows[1]))
    assert torch.equal(together[0, 5], linear.bias.detach())  # a zero row gives the bias


@needs_int8
def test_int8_linear_runs_in_and_out_of_inference_mode(linear: nn.Linear, backend: str) -> None:
    # The engine calls layers under inference mode; an adapter's predict called directly,
    # or a user's forward, may not, with gradients on. The first call's scratch buffers
    # (fbgemm's, per shape and thread) must serve the later calls either way. (Each width
    # its own: no other test has made this one's buffer.)
    layer = nn.Linear(97, 40)
    int8 = int8_linear.Int8Linear(layer, kernel=backend == "kernel")
    x = torch.randn(3, 97)
    with torch.inference_mode():
        first = int8(x)
    assert torch.equal(int8(x), first)
    with_grad = int8(x.clone().requires_grad_())
    assert torch.equal(with_grad, first)
    assert not with_grad.requires_grad  # (no gradient flows through int8 weights)
    with torch.inference_mode():
        assert torch.equal(int8(x), first)


@needs_int8
def test_int8_weight_attribute_describes_the_layer(linear: nn.Linear) -> None:
    int8 = int8_linear.Int8Linear(linear)
    assert int8.weight.shape == (40, 96)
    assert int8.weight.dtype == torch.int8


@needs_int8
def test_quantize_linears_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    assert int8_linear.quantize_linears(model) == 2
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model(torch.randn(2, 8)).shape == (2, 4)


@pytest.fixture
def vision() -> BlipVisionModel:
    torch.manual_seed(0)
    config = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    model = BlipVisionModel(config).eval()
    # The config's own initializer_range (1e-10) would make every layer a near no-op, and
    # any two attention implementations trivially equal: real-scale weights instead.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)],  # (GPU dtypes too)
)
def test_sdpa_attention_matches_the_eager_code(
    vision: BlipVisionModel, dtype: torch.dtype, tolerance: float
) -> None:
    vision.to(dtype)
    pixels = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.inference_mode():
        eager = vision(pixel_values=pixels).last_hidden_state
        assert vision_encoder.use_sdpa(vision) == 2
        fused = vision(pixel_values=pixels).last_hidden_state
        assert vision_encoder.use_sdpa(vision, enabled=False) == 2
        back = vision(pixel_values=pixels).last_hidden_state
    assert fused.dtype == dtype
    torch.testing.assert_close(fused, eager, rtol=tolerance, atol=tolerance)
    assert torch.equal(back, eager)


def test_bf16_attention_is_close_to_the_eager_code(vision: BlipVisionModel) -> None:
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        eager = vision(pixel_values=pixels).last_hidden_state
        assert vision_encoder.set_vision_attention(vision, "bf16") == 2
        bf16 = vision(pixel_values=pixels).last_hidden_state
        one = vision(pixel_values=pixels[1:2]).last_hidden_state
    assert bf16.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: close to float32, not equal to it.
    torch.testing.assert_close(bf16, eager, rtol=0.05, atol=0.05)
    assert not torch.equal(bf16, eager)
    torch.testing.assert_close(one, bf16[1:2], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown vision attention"):
        vision_encoder.set_vision_attention(vision, "flash")


def test_int8_models_get_bf16_vision_attention_where_the_cpu_has_bf16(
    vision: BlipVisionModel,
) -> None:
    cpu = torch.device("cpu")
    optimize.prepare(vision, BlipCaptionAdapter.speedups(Precision(torch.float32, int8=True), cpu))
    attention = vision.encoder.layers[0].self_attn
    expected = (
        vision_encoder._bf16_forward if cpu_has_native_bf16() else vision_encoder._sdpa_forward
    )
    assert attention.forward.func is expected


def test_vision_split_per_image_returns_the_same_outputs(vision: BlipVisionModel) -> None:
    holder = nn.Module()
    holder.vision_model = vision
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        whole = vision(pixel_values=pixels, output_hidden_states=True)
        whole_tuple = vision(pixel_values=pixels, return_dict=False)
        vision_encoder.split_vision_batches(holder, rows=1)
        split = vision(pixel_values=pixels, output_hidden_states=True)
        split_tuple = vision(pixel_values=pixels, return_dict=False)
    assert type(split) is type(whole)
    torch.testing.assert_close(split.last_hidden_state, whole.last_hidden_state)
    torch.testing.assert_close(split.pooler_output, whole.pooler_output)
    assert len(split.hidden_states) == len(whole.hidden_states) == 3
    for a, b in zip(split.hidden_states, whole.hidden_states, strict=True):
        torch.testing.assert_close(a, b)
    assert isinstance(split_tuple, tuple)
    torch.testing.assert_close(split_tuple[0], whole_tuple[0])


@pytest.fixture(scope="module")
def demo_caption() -> tuple[Any, Any]:
    """The trained `demo` captioner: real weights, so its captions mean something."""
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from blipserve.models import builtin_path

    folder = builtin_path("demo")
    return (
        AutoProcessor.from_pretrained(folder),
        BlipForConditionalGeneration.from_pretrained(folder).eval(),
    )


def test_lean_text_layers_compute_what_transformers_computes(
    demo_caption: tuple[Any, Any],
) -> None:
    from blipserve.finetune import scenes

    processor, model = demo_caption
    lean = copy.deepcopy(model)
    assert lean_text.lean_text_layers(lean) == len(model.text_decoder.bert.encoder.layer) == 4
    layer = lean.text_decoder.bert.encoder.layer[0]
    assert not hasattr(layer.attention.self, "query")  # transformers' forward cannot run
    images = [scenes.scene_at(scenes.HELDOUT_SEED, i).image for i in range(8)]
    # Prompts of two lengths in one batch: a padded, causal self-attention mask.
    prompted = processor(
        images=images, text=["a small", "a large red"] * 4, return_tensors="pt", padding=True
    )
    plain = processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        want, got = model(**prompted).logits, lean(**prompted).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # Decoding with the key/value cache (cross-attention keys/values from step 1 on)
        captions = model.generate(**plain, max_new_tokens=30)
        assert torch.equal(lean.generate(**plain, max_new_tokens=30), captions)
        # int8: one fused query/key/value layer is bit-identical to three.
        int8, lean_int8 = copy.deepcopy(model), copy.deepcopy(lean)
        int8_linear.quantize_linears(int8)
        int8_linear.quantize_linears(lean_int8)
        assert torch.equal(lean_int8(**prompted).logits, int8(**prompted).logits)
    lean.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        lean(**prompted)


def test_cpu_models_get_lean_text_layers(demo_caption: tuple[Any, Any]) -> None:
    model = copy.deepcopy(demo_caption[1])
    cpu = torch.device("cpu")
    optimize.prepare(model, BlipCaptionAdapter.speedups(Precision(torch.float32), cpu))
    layer = model.text_decoder.bert.encoder.layer[0]
    assert layer.forward.func is lean_text._lean_text_layer


@needs_int8
def test_int8_vision_layers_take_one_scale_per_image(
    demo_caption: tuple[Any, Any], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vision encoder runs one image per call, so with fbgemm its layers use the
    whole-input scale (no per-row passes) and an image's features still do not depend on
    its batch; likewise the decoder's keys and values of the image tokens, and so its
    captions.  (blipserve's kernel scales every row on its own, so no layer depends on
    its batch.)"""
    from blipserve.finetune import scenes

    processor, model = demo_caption
    model = copy.deepcopy(model)
    monkeypatch.setattr(blip, "amx_bf16", lambda device: False)  # (the image's keys in int8)
    kernel = "blipserve" if backend == "kernel" else "fbgemm"
    precision = Precision(torch.float32, True, kernel)
    optimize.prepare(model, BlipCaptionAdapter.speedups(precision, torch.device("cpu")))
    vision = [m for m in model.vision_model.modules() if isinstance(m, int8_linear.Int8Linear)]
    text = [m for m in model.text_decoder.modules() if isinstance(m, int8_linear.Int8Linear)]
    assert vision
    one_scale = backend == "fbgemm"
    assert all(m.per_row is not one_scale for m in vision)
    layers = model.text_decoder.bert.encoder.layer
    image_kv = {id(layer.crossattention.self.kv) for layer in layers}
    assert all(m.per_row is not one_scale for m in text if id(m) in image_kv)
    assert all(layer.crossattention.self.kv_rows == 1 for layer in layers)
    assert all(m.per_row for m in text if id(m) not in image_kv)  # the decoding rows
    images = [scenes.scene_at(scenes.HELDOUT_SEED, i).image for i in range(4)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        together = model.vision_model(pixel_values=pixels).last_hidden_state
        alone = model.vision_model(pixel_values=pixels[2:3]).last_hidden_state
        assert torch.equal(together[2:3], alone)
        captions = model.generate(pixel_values=pixels, max_new_tokens=12)
        one = model.generate(pixel_values=pixels[2:3], max_new_tokens=12)  # (1, L <= 13)
    assert torch.equal(one[0], captions[2, : one.shape[1]])  # (the batch pads after EOS)
    assert (captions[2, one.shape[1] :] == processor.tokenizer.pad_token_id).all()


@needs_int8
def test_amx_image_keys_values_do_not_depend_on_their_batch(
    demo_caption: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bf16 (AMX), an image's keys and values are projected one image per call, so
    they do not depend on the batch; nor, then, do the captions."""
    from blipserve.finetune import scenes

    processor, model = demo_caption
    model = copy.deepcopy(model)
    monkeypatch.setattr(blip, "cpu_has_native_bf16", lambda: True)  # (AMX has it)
    monkeypatch.setattr(blip, "amx_bf16", lambda device: True)
    optimize.prepare(model, BlipCaptionAdapter.speedups(INT8, CPU))
    cross = model.text_decoder.bert.encoder.layer[0].crossattention.self
    assert type(cross.kv) is lean_text.Bf16Linear
    images = [scenes.scene_at(scenes.HELDOUT_SEED, i).image for i in range(4)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        states = model.vision_model(pixel_values=pixels).last_hidden_state  # (4, N, E)
        head_dim = cross.attention_head_size
        keys, values = lean_text._image_keys_values(cross, states, head_dim)
        key, value = lean_text._image_keys_values(cross, states[2:3], head_dim)
        captions = model.generate(pixel_values=pixels, max_new_tokens=12)
        one = model.generate(pixel_values=pixels[2:3], max_new_tokens=12)  # (1, L <= 13)
    assert keys.dtype == torch.bfloat16
    assert torch.equal(keys[2:3], key)
    assert torch.equal(values[2:3], value)
    assert torch.equal(one[0], captions[2, : one.shape[1]])


CPU, CUDA = torch.device("cpu"), torch.device("cuda")
INT8 = Precision(torch.float32, int8=True)
F32, BF16 = Precision(torch.float32), Precision(torch.bfloat16)
INT8_STEPS = ["int8 vision encoder (one image a call)", "int8 linears"]
AMX_VISION = "AMX vision encoder (one image a call)"
BLIP_INT8_STEPS = [INT8_STEPS[0], "int8 image keys and values", INT8_STEPS[1]]
BLIP_CPU_STEPS = ["keep freed memory", "lean text layers"]


@pytest.mark.parametrize(
    ("adapter", "precision", "device", "native_bf16", "expected"),
    [
        (
            BlipCaptionAdapter,
            INT8,
            CPU,
            True,
            [
                *BLIP_CPU_STEPS,
                "bf16 vision attention",
                *BLIP_INT8_STEPS,
                "bf16 image keys and values",
            ],
        ),
        (
            BlipVqaAdapter,
            INT8,
            CPU,
            False,
            [*BLIP_CPU_STEPS, "sdpa vision attention", *BLIP_INT8_STEPS],
        ),
        (BlipMatchAdapter, F32, CPU, True, [*BLIP_CPU_STEPS, "sdpa vision attention"]),
        (BlipCaptionAdapter, BF16, CPU, True, BLIP_CPU_STEPS),
        (BlipCaptionAdapter, F32, CUDA, True, ["sdpa vision attention"]),
        (BlipVqaAdapter, BF16, CUDA, True, ["sdpa vision attention"]),
        (Blip2Adapter, INT8, CPU, True, ["keep freed memory", *INT8_STEPS]),
        (Blip2Adapter, F32, CPU, True, ["keep freed memory"]),
        (Blip2Adapter, BF16, CUDA, True, []),
    ],
)
def test_each_family_declares_its_speedups(
    monkeypatch: pytest.MonkeyPatch,
    adapter: type[HFAdapter],
    precision: Precision,
    device: torch.device,
    native_bf16: bool,
    expected: list[str],
) -> None:
    monkeypatch.setattr(blip, "cpu_has_native_bf16", lambda: native_bf16)
    for module in (base, blip):
        monkeypatch.setattr(module, "amx_bf16", lambda device: False)
    assert [s.name for s in adapter.speedups(precision, device)] == expected


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_every_speedup_name_is_one_disable_speedup_knows(
    monkeypatch: pytest.MonkeyPatch, amx: bool, native_bf16: bool
) -> None:
    # (--disable-speedup refuses a name outside ALL_NAMES as a typo, on any host)
    monkeypatch.setattr(blip, "cpu_has_native_bf16", lambda: native_bf16)
    for module in (base, blip, blip2_itm):
        monkeypatch.setattr(module, "amx_bf16", lambda device: amx)
    seen = set()
    for adapter in set(ADAPTERS.values()):
        for precision in (INT8, F32, BF16):
            for device in (CPU, CUDA):
                for attention in ("auto", "eager", "sdpa", "bf16"):
                    seen |= {s.name for s in adapter.speedups(precision, device, attention)}
    assert seen <= optimize.ALL_NAMES, seen - optimize.ALL_NAMES
    if amx and native_bf16:  # (every name is some host's: none is stale)
        assert seen == optimize.ALL_NAMES


def test_blip_int8_on_amx_projects_the_image_keys_values_in_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blip, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(blip, "amx_bf16", lambda device: True)
    monkeypatch.setattr(base, "amx_bf16", lambda device: True)
    names = [s.name for s in BlipCaptionAdapter.speedups(INT8, CPU)]
    # (each int8 step right after an AMX one is then skipped as replaced)
    assert names == [
        *BLIP_CPU_STEPS,
        "bf16 vision attention",
        AMX_VISION,
        INT8_STEPS[0],
        "AMX image keys and values",
        *BLIP_INT8_STEPS[1:],
        "bf16 image keys and values",
    ]
    blip2 = [s.name for s in Blip2Adapter.speedups(INT8, CPU)]
    assert blip2 == ["keep freed memory", AMX_VISION, *INT8_STEPS]
    # on the tiles where the CPU has them; never on a GPU (amx_bf16 is False there)
    monkeypatch.undo()
    cuda = [s.name for s in BlipCaptionAdapter.speedups(INT8, CUDA)]
    assert not [name for name in cuda if "AMX" in name]
