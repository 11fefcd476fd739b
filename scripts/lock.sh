#!/usr/bin/env bash
# Refresh constraints.txt, the exact versions scripts/setup.sh installs: resolve
# blipserve[dev] afresh (newest releases within pyproject.toml's ranges) in a throwaway venv
# and write what it installed. Then run the full test command (bash scripts/test.sh), and
# commit constraints.txt only if it passes. Takes a few minutes (downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${BLIPSERVE_EXTRAS:-dev}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PYTHON" -m venv "$venv"
pyver=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"  # as setup.sh: the local CPU build
"$venv/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
{
  echo "# The exact versions the test suite last passed with; scripts/setup.sh installs them"
  echo "# (pip install -c constraints.txt). Written by scripts/lock.sh on $(date -u +%F) with"
  echo "# $("$venv/bin/python" --version) on $(uname -m); pyproject.toml keeps the ranges"
  echo "# that people installing blipserve as a library get. Each pin holds for this Python"
  echo "# version only (its marker): on another, pip resolves those ranges instead."
  # torch without its local label (+cpu): '==2.13.0' matches the local CPU build and a
  # CUDA machine's build alike (PEP 440 ignores the label when the pin has none)
  "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v "^pip==" \
    | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f | sed "s/\$/ ; python_version == \"$pyver\"/"
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
