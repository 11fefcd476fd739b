#!/usr/bin/env bash
# Create .venv and install blipserve with what the tests need, at the exact versions the
# suite last passed with (constraints.txt; refresh it with scripts/lock.sh). Idempotent and
# quick when nothing changed. torch is pinned first: on our machines `torch==2.13.0` is a
# local CPU build, while an unpinned `torch` would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${BLIPSERVE_EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.blipserve-setup
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
