"""Helpers shared by the benchmarks: random-weight models shaped like the real checkpoints,
machine information, percentiles, test photos, and real server processes on free ports.

Models are built from the published non-weight files in ``tests/data/hf-layouts`` (real
config, tokenizer and processor settings) with random weights, so a benchmark runs the exact
architecture and input size of e.g. ``Salesforce/blip-image-captioning-base`` (~247M
parameters, 384 px) without downloading anything.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ROOT / "tests" / "data" / "hf-layouts"
SEED = 0
SPEC_FILE = "bench-model.json"  # what a cached folder was built from


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


# -- machine and statistics ----------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) with linear interpolation (numpy's default); NaN
    for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- test images ---------------------------------------------------------------------------

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def sample_images(
    count: int = len(PHOTOS), size: tuple[int, int] = (640, 480), quality: int = 90
) -> list[str]:
    """``count`` scikit-image sample photos, resized to ``size``, as base64 JPEG text."""
    data: Any = importlib.import_module("skimage.data")  # untyped library
    out = []
    for i in range(count):
        photo = np.asarray(getattr(data, PHOTOS[i % len(PHOTOS)])())
        image = Image.fromarray(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if i >= len(PHOTOS):  # more images than photos: mirror, so every body differs
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# -- server processes ----------------------------------------------------------------------


@dataclass
class RunningServer:
    """A server subprocess listening on ``url``; its output goes to ``log``."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    argv: list[str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (in-flight requests finish), then SIGKILL after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_server(
    argv: Sequence[str],
    workdir: Path,
    *,
    name: str = "server",
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start ``argv`` plus ``--port 0 --port-file FILE``; return once ``GET /ready`` is 200.

    Raises ``RuntimeError`` with the server's output if it exits or is not ready in time.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
    full = [*argv, "--port", "0", "--port-file", str(port_file)]
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=environ)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        if url is None and port_file.exists():
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        if url is not None:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return RunningServer(name, url, proc, log, full)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(
        f"{name} not ready after {timeout:.0f} s:\n{log.read_text(errors='replace')}"
    )


def python_command(*args: str) -> list[str]:
    """``args`` run by this interpreter (the project's virtual environment)."""
    return [sys.executable, *args]
