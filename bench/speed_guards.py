"""bench/speed.py's quality guards: the trained demo models' captions per dtype against
float32's, and with a static KV cache (``--cuda-graphs``) against without, on held-out
scenes."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from PIL import Image
from speed_models import log


def png_b64(image: Image.Image) -> str:
    """``image`` as a base64 PNG row (the demo scenes are drawn, so lossless)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def quality_guard(device: Any, n: int) -> dict[str, Any]:
    """The ``demo`` model's captions per dtype on ``n`` held-out scenes, against float32 with
    the processor's image resize (transformers' own path, as the model card measures)."""
    from blipserve.config import ModelConfig
    from blipserve.config.serving import Backend, ImageResize
    from blipserve.engine import Engine
    from blipserve.finetune import scenes
    from blipserve.types import RowInput

    held = list(scenes.generate(scenes.HELDOUT_SEED + 1, n))
    rows = [RowInput(i, png_b64(scene.image)) for i, scene in enumerate(held)]
    said: dict[str, list[str]] = {}
    dtypes = (
        ("float32", "bfloat16", "float16")
        if device.type == "cuda"
        else ("float32", "bfloat16", "int8", "int8+ov", "bfloat16+ov")
    )
    for mode in dtypes:
        dtype, ov, _ = mode.partition("+ov")
        backend: Backend = "openvino" if ov else "torch"
        # The reference is transformers' own arithmetic, its image processor included (on a
        # GPU the other modes resize on the device: --image-resize auto).
        resize: ImageResize = "processor" if mode == "float32" else "auto"
        config = ModelConfig(
            model="demo",
            device=device.type,
            dtype=dtype,  # type: ignore[arg-type]
            backend=backend,
            image_resize=resize,
        )
        try:
            engine = Engine.load(config)
        except Exception as exc:  # e.g. no OpenVINO here
            log(f"quality guard: {mode} not measured: {exc}")
            continue
        with engine:
            said[mode] = [getattr(o, "text", "") for o in engine.predict(rows)]
    truth = [s.caption for s in held]
    out: dict[str, Any] = {"scenes": n}
    for dtype, texts in said.items():
        out[dtype] = {
            "exact": sum(a == b for a, b in zip(texts, truth, strict=True)) / n,
            "same_as_float32": sum(a == b for a, b in zip(texts, said["float32"], strict=True)) / n,
        }
    return out


#: the trained demo model that checks a layout's family with --cuda-graphs
STATIC_GUARD_MODEL = {"blip-image-captioning-base": "demo", "blip2-opt-2.7b": "demo-vqa"}


def static_cache_guard(device: Any, n: int, dtype: str, model: str) -> dict[str, Any]:
    """``model`` (``demo``: a trained BLIP captioner; ``demo-vqa``: a trained BLIP-2 with an
    OPT decoder) with ``--cuda-graphs`` and without: its captions (and ``demo-vqa``'s
    answers to every question of each scene) on ``n`` held-out scenes, the share that are
    the same, each side's exact match, and the wall time of each side's pass (the compiled
    side's includes its compilations: batches of several sizes).
    """
    from blipserve.config import EngineConfig, ModelConfig
    from blipserve.engine import Engine
    from blipserve.finetune import scenes
    from blipserve.types import RowInput

    held = list(scenes.generate(scenes.HELDOUT_SEED + 1, n))
    rows: list[RowInput] = []
    truth: list[str] = []
    for scene in held:
        image = png_b64(scene.image)
        rows.append(RowInput(len(rows), image))
        truth.append(scene.caption)
        for qa in scene.qa if model == "demo-vqa" else ():
            rows.append(RowInput(len(rows), image, qa.prompt))
            truth.append(qa.answer)
    out: dict[str, Any] = {"model": model, "scenes": n, "rows": len(rows), "dtype": dtype}
    said: dict[bool, list[str]] = {}
    for graphs in (False, True):
        cfg = ModelConfig(model=model, device=device.type, dtype=dtype, cuda_graphs=graphs)  # type: ignore[arg-type]
        t = time.perf_counter()
        with Engine.load(cfg, config=EngineConfig(max_batch_size=32)) as engine:
            said[graphs] = [getattr(o, "text", "") for o in engine.predict(rows)]
            first = time.perf_counter() - t
            t = time.perf_counter()
            engine.predict(rows)
            second = time.perf_counter() - t
        key = "cuda_graphs" if graphs else "eager"
        out[key] = {
            "exact": sum(a == b for a, b in zip(said[graphs], truth, strict=True)) / len(rows),
            "first_pass_s": first,
            "second_pass_s": second,
        }
        log(f"{model} {key}: {out[key]}")
    out["same"] = sum(a == b for a, b in zip(said[True], said[False], strict=True)) / len(rows)
    log(f"{model} with --cuda-graphs says what it says without for {out['same']:.1%} of rows")
    return out
