"""Environment variables for the processes tests and benchmarks start."""

from __future__ import annotations

#: a local Ray cluster's environment in tests and benchmarks: offline and quiet (no usage
#: stats, no dashboard, no token file in $HOME)
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "HF_HUB_OFFLINE": "1",
}
