#!/usr/bin/env bash
# The test command: set up .venv, then lint, type-check and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k contract).
#
#   bash scripts/test.sh --fast [pytest args]   the unit tier alone, for a developer's loop:
#       no Chromium, emulators or linters, and no test marked heavy (model conversion,
#       training, C compilation, torch.compile, subprocesses); about 1-2 minutes on 2 cores.
#       CI runs the full command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
  shift
  bash scripts/setup.sh  # a no-op when .venv is up to date
  exec .venv/bin/python -m pytest tests/unit -m "not heavy and not slow" -q "$@"
fi
bash scripts/setup.sh
bash scripts/install_chromium.sh  # for the browser tests of /ui
bash scripts/install_azurite.sh   # Azure Blob emulator for the object-storage tests
.venv/bin/ruff check src tests bench testkit
.venv/bin/ruff format --check src tests bench testkit
.venv/bin/mypy
.venv/bin/lint-imports  # the layers contract in pyproject.toml ([tool.importlinter])
# pytest exits 5 when it collects no test: that is a failure here too.
.venv/bin/python -m pytest "$@"
