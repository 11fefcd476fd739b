"""The architecture stays: the import-linter layers contract (pyproject.toml) holds, and
catches a wrong-way import; modules stay small."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import blipserve

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(blipserve.__file__).parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 400

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[dev]')"
)


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """Run the project's contract on the ``blipserve`` package found in ``package_parent``."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.heavy  # lint-imports in a subprocess
def test_the_layers_contract_is_kept() -> None:
    result = lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.heavy  # lint-imports in a subprocess
@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a model adapter reaching up into the HTTP layer
        ("models/base.py", "from blipserve.server.app import create_app", "blipserve.models"),
        # the server hosts batch jobs through jobs/ (the batch endpoint), never directly
        ("server/app.py", "from blipserve.batch.runner import BatchJob", "blipserve.server"),
        # and batch jobs know nothing of the server that may host them
        ("batch/runner.py", "from blipserve.server.app import create_app", "blipserve.batch"),
        # the MLflow model runs the engine, not the HTTP server
        ("mlflow/pyfunc.py", "from blipserve.server.app import create_app", "blipserve.mlflow"),
        # core types know nothing of the engine
        ("types.py", "from blipserve.engine import Engine", "blipserve.types"),
    ],
)
def test_a_wrong_way_import_breaks_it(tmp_path: Path, module: str, line: str, broken: str) -> None:
    # the sources only: not the demo models' weights
    skip = shutil.ignore_patterns("*.safetensors", "__pycache__", "*.so")
    shutil.copytree(PACKAGE, tmp_path / "blipserve", ignore=skip)
    target = tmp_path / "blipserve" / module
    target.write_text(target.read_text() + f"\n{line}  # wrong way\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{broken} is not allowed to import" in result.stdout


def test_modules_stay_small() -> None:
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
