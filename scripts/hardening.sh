#!/usr/bin/env bash
# The long hardening suites, marked `slow` (the default test command runs a short version of
# each): the soak (16 clients on loopback), 20 SIGKILLs of a batch job then resume, a long
# OpenAPI fuzz run against the real server, and generation right up to the models' limits.
# Throughput, latency percentiles and memory are printed. About 15 minutes on 2 CPU cores.
#
#   BLIPSERVE_SOAK_S          seconds of soak load (default 300)
#   BLIPSERVE_SLOW_KILLS      SIGKILLs of the batch job, at least 20 (default 20)
#   BLIPSERVE_FUZZ_EXAMPLES   schemathesis cases per operation and mode (default 500)
#
# Extra arguments go to pytest (e.g. scripts/hardening.sh -k soak).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export BLIPSERVE_SOAK_S="${BLIPSERVE_SOAK_S:-300}"
export BLIPSERVE_SLOW_KILLS="${BLIPSERVE_SLOW_KILLS:-20}"
export BLIPSERVE_FUZZ_EXAMPLES="${BLIPSERVE_FUZZ_EXAMPLES:-500}"
# -s: show the measurements the tests print; pytest exits 5 when no test is selected.
.venv/bin/python -m pytest -m slow -s -ra "$@"
