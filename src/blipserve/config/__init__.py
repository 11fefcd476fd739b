"""One typed configuration for every entry point.

Each part is a frozen dataclass whose fields declare, once, their default, their help,
their flag and their environment variable (``BLIPSERVE_<FIELD>``): :mod:`.serving` (the
model, the engine, images, image URLs, the HTTP server), :mod:`.jobs` (batch jobs, Ray),
composed by :class:`Settings` (:mod:`.settings`), with :mod:`.endpoint_jobs` (batch jobs
the server hosts); :mod:`.fields` says how a field is read.
The CLI derives its flags from the fields; the environment is read only when settings are
built, never at import time.
"""

from blipserve.config.endpoint_jobs import JobsConfig
from blipserve.config.fields import from_env, option, values_of
from blipserve.config.jobs import (
    BatchConfig,
    FailureLimit,
    OutputFormat,
    RayConfig,
    ReplicaConfig,
    parse_storage_options,
)
from blipserve.config.serving import (
    Backend,
    Device,
    DType,
    EngineConfig,
    FetchConfig,
    ImageLimits,
    Int8Kernel,
    ModelConfig,
    ServerConfig,
)
from blipserve.config.settings import PARTS, Settings

__all__ = [
    "PARTS",
    "Backend",
    "BatchConfig",
    "DType",
    "Device",
    "EngineConfig",
    "FailureLimit",
    "FetchConfig",
    "ImageLimits",
    "Int8Kernel",
    "JobsConfig",
    "ModelConfig",
    "OutputFormat",
    "RayConfig",
    "ReplicaConfig",
    "ServerConfig",
    "Settings",
    "from_env",
    "option",
    "parse_storage_options",
    "values_of",
]
