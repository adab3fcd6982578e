"""Imagery backends: Earth Engine, local rasters, XYZ tile servers; one interface.

``get_backend(config)`` returns this process's backend for a ``BackendConfig`` (opened once per
worker process and shared by its threads); ``Backend.fetch(TileRequest) -> TileResult``. A
request names its image source by alias; the backend reads the source (bands, stretch, cloud
rule, location) from the catalog in its ``BackendConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from image_sources import BACKENDS, Catalog, ImageSource, default_catalog

from ..._once import once_per_process
from ...errors import ConfigError
from .base import (
    RETRYABLE_REASONS,
    Backend,
    FetchError,
    RetryPolicy,
    TileRequest,
    TileResult,
)
from .limits import LimitsConfig, process_limits

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendConfig",
    "FetchError",
    "RETRYABLE_REASONS",
    "RetryPolicy",
    "TileRequest",
    "TileResult",
    "get_backend",
]


@dataclass(frozen=True)
class BackendConfig:
    """How to reach the imagery (picklable: it travels to every worker).

    Attributes:
        backend: ``earthengine``, ``raster`` or ``xyz``.
        ee_url: an Earth Engine endpoint (an emulator's URL); None: the high-volume endpoint.
        project: the Cloud project for Earth Engine.
        key_file: a service-account key file (else ``EE_SERVICE_ACCOUNT_KEY``, else default
            credentials).
        location: overrides the source's folder (raster) or URL template (xyz).
        timeout_s: per-request timeout.
        max_attempts: requests per tile before it is recorded as failed.
        allow_next_year: try the request's next candidate year when a year has no image.
        limits: the run's concurrency and rate caps.
        catalog: the image sources the requests name (default: the default catalog).
    """

    backend: str = "earthengine"
    ee_url: str | None = None
    project: str | None = None
    key_file: str | None = None
    location: str | None = None
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_s: float = 0.5
    allow_next_year: bool = False
    limits: LimitsConfig = LimitsConfig()
    catalog: Catalog = field(default_factory=default_catalog)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"max attempts must be at least 1, got {self.max_attempts}")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, base_s=self.backoff_s)

    def source(self, alias: str) -> ImageSource:
        """The image source ``alias`` (an unknown alias is a ConfigError)."""
        return self.catalog.get_source(alias)


@once_per_process
def get_backend(config: BackendConfig) -> Backend:
    """This process's backend for ``config``, opened on first use."""
    limits = process_limits(config.limits)
    backend: Backend
    if config.backend == "earthengine":
        from .earthengine import EarthEngineBackend

        backend = EarthEngineBackend(config, limits)
    elif config.backend == "raster":
        from .raster import RasterBackend

        backend = RasterBackend(config, limits)
    else:
        from .xyz import XyzBackend

        backend = XyzBackend(config, limits)
    backend.open()
    return backend


def close_backends() -> None:
    """Close every backend this process opened (tests)."""
    get_backend.forget(close=Backend.close)
