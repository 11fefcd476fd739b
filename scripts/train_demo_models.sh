#!/usr/bin/env bash
# Retrain the built-in demo models from scratch on synthetic scenes, measure them on 500
# held-out scenes and write their model cards:
#   src/blipserve/demo/models/demo/      BLIP captioning
#   src/blipserve/demo/models/demo-vqa/  BLIP-2 (small OPT): captions and "Question: ... Answer:"
# About 57 minutes on 2 CPU cores (35 + 22); runs at the lowest priority so other work is not slowed.
# Arguments pick the models (default: both), e.g. scripts/train_demo_models.sh demo-vqa.
# Checkpoints go to $BLIPSERVE_DEMO_WORK (default /tmp/blipserve-demo-train): run the
# script again after an interruption and it continues from the last one; delete that
# folder to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec nice -n 19 .venv/bin/python -m blipserve.demo.train_models "$@"
