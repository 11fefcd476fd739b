"""Load a model by built-in name, Hugging Face id or local folder, and wrap it in an adapter."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from blipserve.config import ModelConfig
from blipserve.errors import ModelLoadError
from blipserve.models import blip, blip2, blip2_itm, instructblip  # noqa: F401  (registers the adapters)
from blipserve.models.base import Adapter, HFAdapter
from blipserve.models.precision import resolve_device, resolve_precision, resolve_vision_backend
from blipserve.models.registry import ADAPTERS
from blipserve.models.vision_encoder import split_vision_batches
from blipserve.types import ModelInput

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("demo", "demo-vqa")
_HUB_ID = re.compile(r"(?![.~/])[\w.-]+(/[\w.-]+)?")

__all__ = ["ADAPTERS", "BUILTIN_MODELS", "Adapter", "ModelInput", "load_model", "resolve_source"]


def builtin_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "demo" / "models" / name


def resolve_source(model: str) -> str:
    """A built-in name -> its folder; an existing folder -> itself; otherwise a hub id."""
    if model in BUILTIN_MODELS:
        path = builtin_path(model)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"built-in model {model!r} is missing from this installation ({path}); "
                "reinstall blipserve or regenerate it with scripts/train_demo_models.sh"
            )
        return str(path)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {model!r} has no config.json; pass a folder written by "
                "save_pretrained (config.json, weights, tokenizer and processor files)"
            )
        return str(path)
    if not _HUB_ID.fullmatch(model):
        raise ModelLoadError(
            f"model {model!r}: no such folder, and it is not a Hugging Face id (owner/name)"
        )
    return model


def load_model(cfg: ModelConfig) -> HFAdapter:
    """Load ``cfg.model`` and return the adapter for its architecture.

    Every failure is a :class:`ModelLoadError` naming the model and what to do.
    """
    source = resolve_source(cfg.model)
    config = _load_config(cfg.model, source, cfg.revision)
    architectures: list[str] = list(getattr(config, "architectures", None) or [])
    adapter_cls = next((ADAPTERS[a] for a in architectures if a in ADAPTERS), None)
    if adapter_cls is None:
        found = ", ".join(architectures) or f"model_type {getattr(config, 'model_type', '?')!r}"
        raise ModelLoadError(
            f"model {cfg.model!r} has architecture {found}, which blipserve does not serve; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.dtype, device, cfg.int8_kernel)
    if cfg.cuda_graphs and device.type != "cuda":
        raise ModelLoadError(
            f"--cuda-graphs needs a CUDA GPU; model {cfg.model!r} would run on {device.type}"
        )
    vision = resolve_vision_backend(cfg.backend, device, precision, adapter_cls.openvino_when_auto)
    how = f"int8 ({precision.int8_kernel}'s kernel)" if precision.int8 else str(precision)
    log.info(
        "loading %s (%s) on %s as %s, vision encoder on %s",
        *(cfg.model, adapter_cls.kind, device, how, vision),
    )
    try:
        adapter = adapter_cls.load(
            source,
            device=device,
            precision=precision,
            revision=cfg.revision,
            vision=vision,
            fallback=cfg.backend == "auto",
        )
        if cfg.vision_batch_size:
            _split_vision(adapter, cfg.vision_batch_size, cfg.model)
        if cfg.cuda_graphs:
            adapter.use_static_cache(cfg.model)
        if cfg.image_resize == "device" or (cfg.image_resize == "auto" and device.type == "cuda"):
            adapter.resize_on_device(required=cfg.image_resize == "device")
        return adapter
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"model {cfg.model!r} ({source}) could not be loaded as {adapter_cls.kind}: "
            f"{_first_line(exc)}"
        ) from exc


def _split_vision(adapter: HFAdapter, rows: int, name: str) -> None:
    """``--vision-batch-size``: the vision encoder on at most ``rows`` images a call."""
    why = (
        "its vision encoder runs on OpenVINO (use --backend torch)"
        if adapter.vision_backend != "torch"
        else "in int8 the vision encoder takes one image per call already"
        if adapter.precision.int8
        else None
    )
    if why:
        raise ModelLoadError(f"--vision-batch-size: model {name!r}: {why}")
    split_vision_batches(adapter.model, rows)


def _load_config(model: str, source: str, revision: str | None) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except OSError as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"model {model!r}: {_first_line(exc)}") from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else (
                "it is not in the local Hugging Face cache and the Hub could not be reached or "
                "has no such repository"
            )
        )
        raise ModelLoadError(
            f"model {model!r} is not a local folder, and {why}. Pass a local save_pretrained "
            f"folder, or download it first on a machine with internet access "
            f"(hf download {model}) and copy the cache or folder here. "
            f"Details: {_first_line(exc)}"
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(
            f"model {model!r}: unreadable config.json: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
