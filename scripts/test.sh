#!/usr/bin/env bash
# The test command: set up .venv, then lint, type-check and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k contract).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_chromium.sh  # for the browser tests of /ui
bash scripts/install_azurite.sh   # Azure Blob emulator for the object-storage tests
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
.venv/bin/lint-imports  # the layers contract in pyproject.toml ([tool.importlinter])
# pytest exits 5 when it collects no test: that is a failure here too.
.venv/bin/python -m pytest "$@"
