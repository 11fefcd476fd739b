"""Helpers shared by the benchmarks: random-weight models shaped like the real checkpoints,
machine information and load, test photos, and the commands they run.  (What the tests use
too -- server processes on free ports, percentiles, the photographs -- is in ``testkit/``,
which every benchmark script puts on ``sys.path`` with ``bench/``.)

Models are built from the published non-weight files in ``tests/data/hf-layouts`` (real
config, tokenizer and processor settings) with random weights, so a benchmark runs the exact
architecture and input size of e.g. ``Salesforce/blip-image-captioning-base`` (~247M
parameters, 384 px) without downloading anything.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from testkit.models import LAYOUTS
from testkit.photos import photo

ROOT = Path(__file__).resolve().parent.parent

SEED = 0
SPEC_FILE = "bench-model.json"  # what a cached folder was built from
CACHE = Path.home() / ".cache" / "blipserve-bench"  # random models and test JPEGs
BACKGROUND_WARN = 0.10  # warn when other processes keep this share of the CPUs busy


# -- models --------------------------------------------------------------------------------


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for nested dicts."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --quick models: each architecture with its real tokenizer and processor, shrunk to a
# tiny network (seconds on a CPU).
_TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 16,
}
QUICK_BLIP: dict[str, Any] = {
    "vision_config": _TINY_VISION,
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "projection_dim": 64,
    "image_text_hidden_size": 64,
}
QUICK_BLIP2: dict[str, Any] = {
    "vision_config": _TINY_VISION,
    "qformer_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "encoder_hidden_size": 64,
    },
    "text_config": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "word_embed_proj_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
}


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() or (
        folder / "model.safetensors.index.json"
    ).exists()


def build_random_model(
    layout: str, dest: Path, *, overrides: Mapping[str, Any] | None = None
) -> Path:
    """A model folder shaped like the published checkpoint ``layout``, with random weights.

    Copies ``tests/data/hf-layouts/<layout>`` into ``dest`` and saves a random-weight model
    of the architecture named in its ``config.json`` (seed fixed).  ``overrides`` are merged
    into the configuration (nested dicts for ``text_config``/``vision_config``/...); when
    ``vision_config.image_size`` changes, the processor's resize target follows.

    Cached: nothing is done when ``dest`` already holds weights built from the same layout
    and overrides.  The folder is built next to ``dest`` and renamed into place, so an
    interrupted build never leaves a half-written model behind.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    dest = Path(dest)
    spec = {"layout": layout, "overrides": dict(overrides or {}), "seed": SEED}
    if _has_weights(dest):
        try:
            if json.loads((dest / SPEC_FILE).read_text()) == spec:
                return dest
        except (OSError, ValueError):
            pass
    source = LAYOUTS / layout
    if not (source / "config.json").exists():
        known = sorted(p.name for p in LAYOUTS.iterdir() if p.is_dir())
        raise SystemExit(f"unknown layout {layout!r}; known: {', '.join(known)}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        config = AutoConfig.from_pretrained(tmp)
        if overrides:
            # from_dict re-runs the config's own consistency rules (BLIP sets the text
            # decoder's cross-attention width from the vision width).
            config = type(config).from_dict(_merge(config.to_dict(), overrides))
        architecture = (config.architectures or [""])[0]
        model_cls = getattr(transformers, architecture, None)
        if model_cls is None:
            raise SystemExit(f"{layout}: architecture {architecture!r} not in transformers")
        torch.manual_seed(SEED)
        model = model_cls(config).eval()
        model.save_pretrained(tmp)

        image_size = getattr(getattr(config, "vision_config", None), "image_size", None)
        processor = AutoProcessor.from_pretrained(tmp)
        image_processor = getattr(processor, "image_processor", None)
        size = getattr(image_processor, "size", None)
        if image_processor is not None and image_size and size:
            current = size.get("height") if isinstance(size, Mapping) else size
            if current != image_size:
                image_processor.size = {"height": image_size, "width": image_size}
                processor.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")

        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def count_parameters(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (without loading them)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                total += math.prod(f.get_slice(key).get_shape())
    return total


# -- machine and load ----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the instruction sets that decide blipserve's CPU paths (int8 kernel, bf16, AMX)
_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_features() -> list[str]:
    """Which of :data:`_FEATURES` this CPU reports (the same model name covers CPUs with
    and without AVX-512 or AMX: results from them are not comparable)."""
    from blipserve.models.int8_kernel import cpu_flags

    flags = cpu_flags()
    return [f for f in _FEATURES if f in flags]


def machine_info() -> dict[str, Any]:
    """CPU, cores, library versions and torch threads of this machine, for a report."""
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIPSERVE_MAX_BATCH_SIZE")
            if k in os.environ
        },
    }


def background_cpu_busy(seconds: float = 1.0) -> float:
    """Share (0-1) of all CPUs busy over ``seconds``, from /proc/stat (NaN if unreadable)."""

    def snapshot() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return math.nan
    total = total1 - total0
    return (total - (idle1 - idle0)) / total if total else math.nan


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- test images ---------------------------------------------------------------------------

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def sample_images(
    count: int = len(PHOTOS), size: tuple[int, int] = (640, 480), quality: int = 90
) -> list[str]:
    """``count`` scikit-image sample photos, resized to ``size``, as base64 JPEG text."""
    out = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)]).resize(size, Image.Resampling.BICUBIC)
        if i >= len(PHOTOS):  # more images than photos: mirror, so every body differs
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# -- commands ------------------------------------------------------------------------------


def python_command(*args: str) -> list[str]:
    """``args`` run by this interpreter (the project's virtual environment)."""
    return [sys.executable, *args]
