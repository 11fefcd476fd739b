"""Shared fixtures: tiny models built once per session."""

from __future__ import annotations

import os

# No test may reach the Hugging Face Hub: the loading path must work offline. Set before
# transformers / huggingface_hub are imported, since they read these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path

import pytest

import tiny_models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind -> folder of a tiny random model saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: tiny_models.build(kind, root / kind) for kind in tiny_models.BUILDERS}
