"""Where a model comes from: a built-in name, a local ``save_pretrained`` folder or a Hugging
Face id; and its ``config.json``, read first to pick the family that serves it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from blipserve.errors import ModelLoadError

BUILTIN_MODELS = ("demo", "demo-vqa")
_HUB_ID = re.compile(r"(?![.~/])[\w.-]+(/[\w.-]+)?")


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


def load_config(model: str, source: str, revision: str | None) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except OSError as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"model {model!r}: {first_line(exc)}") from exc
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
            f"Details: {first_line(exc)}"
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(f"model {model!r}: unreadable config.json: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
