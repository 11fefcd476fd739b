"""Where blipserve keeps what it builds once per machine (compiled kernels, converted models)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_folders(kind: str) -> list[Path]:
    """Folders for ``kind`` in order of preference: the user's cache (``$XDG_CACHE_HOME``,
    else ``~/.cache``), then a temporary folder of this user's (no home folder, or an
    unwritable one)."""
    temporary = Path(tempfile.gettempdir()) / f"blipserve-{kind}-{os.getuid()}"
    try:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except RuntimeError:  # no home folder to be found
        return [temporary]
    return [Path(base) / "blipserve" / kind, temporary]
