#!/usr/bin/env bash
# The main job: set up .venv, then caption the example images with the built-in demo
# model, offline. Extra arguments go to `blipserve caption`.
set -euo pipefail
cd "$(dirname "$0")/.."
BLIPSERVE_EXTRAS=${BLIPSERVE_EXTRAS:-dev} bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/blipserve caption --model demo examples/*.png "$@"
