"""The docs' measured numbers equal what the committed results files say (bench/docs_tables.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "bench" / "docs_tables.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_block_matches_its_results_files(tables: ModuleType) -> None:
    stale = tables.stale()
    assert stale == [], f"run `python bench/docs_tables.py` after a benchmark run: {stale}"


def test_every_renderer_is_quoted_somewhere(tables: ModuleType) -> None:
    assert tables.used() == set(tables.RENDERERS)


def test_a_changed_number_is_caught(tables: ModuleType, tmp_path: Path) -> None:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "performance.md"
    text = page.read_text()
    # the BLIP-base batch-8 ratio in the CPU table, one digit changed
    edited = re.sub(
        r"(\| 8 \| [\d.]+ \([^)]*\) \| \d+\.)(\d)",
        lambda m: m[1] + "0" if m[2] != "0" else m[1] + "1",
        text,
        count=1,
    )
    assert edited != text
    page.write_text(edited)
    assert tables.stale(tmp_path, tables.RESULTS) == ["docs/performance.md: cpu-blip-base"]


def test_results_files_named_in_the_docs_exist() -> None:
    """Each results file a page names (``speed-cpu-blip2.json``, ``speed-cpu-openvino*.json``:
    a name whose first word is that of a file in bench/results) exists."""
    results = ROOT / "bench" / "results"
    kinds = {f.name.split("-")[0] for f in results.iterdir() if "-" in f.name}
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    named = {
        name
        for page in pages
        for name in re.findall(r"[\w.*-]+\.(?:json|txt)\b", page.read_text())
        if name.split("-")[0] in kinds
    }
    assert len(named) > 10, named
    assert sorted(n for n in named if not list(results.glob(n))) == []
