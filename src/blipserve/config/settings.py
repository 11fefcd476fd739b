"""The one composite configuration: every part, read from the environment when built."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from blipserve.config.endpoint_jobs import JobsConfig
from blipserve.config.fields import from_env
from blipserve.config.jobs import BatchConfig, RayConfig, ReplicaConfig
from blipserve.config.serving import (
    EngineConfig,
    FetchConfig,
    ImageLimits,
    ModelConfig,
    ServerConfig,
)


@dataclass(frozen=True)
class Settings:
    """Everything blipserve can be told, by part; each entry point reads the parts it uses.

    >>> Settings.build({"BLIPSERVE_MAX_BATCH_SIZE": "4"}, model={"model": "demo-vqa"})
    ... # doctest: +ELLIPSIS
    Settings(model=ModelConfig(model='demo-vqa', ...), engine=EngineConfig(max_batch_size=4, ...
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    images: ImageLimits = field(default_factory=ImageLimits)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)

    @classmethod
    def build(
        cls,
        env: Mapping[str, str] | None = None,
        /,
        *,
        parts: Collection[str] | None = None,
        **overrides: Mapping[str, Any],
    ) -> Settings:
        """Settings from ``BLIPSERVE_<FIELD>`` variables (``env``, default ``os.environ``),
        then ``overrides`` by part (``model={"model": "demo"}``; ``None`` values ignored).
        Only ``parts`` (default: all) read the environment, the others keep their defaults:
        a command is not refused for a variable meant for another one.

        The environment is read here, never at import time.  Raises
        :class:`~blipserve.errors.InvalidInput` naming the variable or option that was wrong.
        """
        wanted = set(PARTS if parts is None else parts)
        unknown = (set(overrides) | wanted) - set(PARTS)
        if unknown:
            raise TypeError(f"unknown settings parts: {', '.join(sorted(unknown))}")
        return cls(
            **{
                name: from_env(kind, env if name in wanted else {}, **overrides.get(name, {}))
                for name, kind in PARTS.items()
            }
        )


#: each part's name (the ``Settings`` attribute) and its class, in the order of ``--help``
PARTS: Final[Mapping[str, type[Any]]] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)
}
