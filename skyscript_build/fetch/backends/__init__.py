"""Imagery backends: Earth Engine, local rasters, XYZ tile servers; one interface.

``get_backend(config)`` returns this process's backend for a ``BackendConfig`` (opened once per
worker process and shared by its threads); ``Backend.fetch(TileRequest) -> TileResult``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from image_sources import BACKENDS

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
    "clear_source_cache",
    "FetchError",
    "RETRYABLE_REASONS",
    "RetryPolicy",
    "SourceInfo",
    "TileRequest",
    "TileResult",
    "get_backend",
    "resolve_source",
    "source_info",
    "use_sources",
]


@dataclass(frozen=True)
class SourceInfo:
    """What a backend needs to know about an image source (from ``image_sources.py``)."""

    alias: str
    collection: str
    bands: tuple[str, ...] = ("R", "G", "B")
    vmin: tuple[float, ...] = (0.0, 0.0, 0.0)
    vmax: tuple[float, ...] = (255.0, 255.0, 255.0)
    gamma: float = 1.0
    backend: str = "earthengine"
    location: str | None = None
    cloud_property: str | None = None
    cloud_max: float | None = None
    cloud_mask_band: str | None = None
    cloud_mask_bits: tuple[int, ...] = ()

    @property
    def has_cloud_rule(self) -> bool:
        return self.cloud_property is not None or self.cloud_mask_band is not None


def _triple(value: Any, default: float) -> tuple[float, ...]:
    if value is None:
        return (default,) * 3
    if isinstance(value, int | float):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


# Sources resolved by the driver of a run (``use_sources``): a Dask worker process does not
# see sources a pipeline registered in the driver's ``image_sources`` catalog.
_RESOLVED: dict[str, SourceInfo] = {}
_CONVERTED: dict[tuple[str, str], tuple[Any, SourceInfo]] = {}
_SOURCES_LOCK = threading.Lock()


def use_sources(infos: Iterable[SourceInfo]) -> None:
    """Make ``source_info`` answer these (resolved elsewhere, e.g. in the run's driver)."""
    with _SOURCES_LOCK:
        for info in infos:
            _RESOLVED[info.alias] = info


def source_info(alias: str, collection: str = "") -> SourceInfo:
    """The source ``alias``, reduced to what backends use.

    From ``use_sources`` when the run's driver resolved it, else from
    ``image_sources.get_source``. Without ``image_sources`` (or for an alias it does not know)
    the source is taken as an 8-bit R, G, B Earth Engine collection named ``collection``.
    """
    info = _RESOLVED.get(alias)
    return info if info is not None else resolve_source(alias, collection)


def clear_source_cache() -> None:
    """Forget resolved and converted sources (after the catalog changed)."""
    with _SOURCES_LOCK:
        _RESOLVED.clear()
        _CONVERTED.clear()


def resolve_source(alias: str, collection: str = "") -> SourceInfo:
    """The source ``alias`` as ``image_sources`` has it now (see ``source_info``)."""
    try:
        import image_sources  # type: ignore[import-not-found]

        src = image_sources.get_source(alias)
    except (ImportError, AttributeError, KeyError):
        return SourceInfo(alias=alias, collection=collection)
    except Exception as e:  # an unknown alias: image_sources raises its own error
        if collection:
            return SourceInfo(alias=alias, collection=collection)
        raise ConfigError(f"unknown image source {alias!r}: {e}") from None
    cached = _CONVERTED.get((alias, collection))
    if cached is not None and cached[0] is src:  # the catalog entry has not been replaced
        return cached[1]
    info = _convert(src, alias, collection)
    with _SOURCES_LOCK:
        _CONVERTED[(alias, collection)] = (src, info)
    return info


def _convert(src: Any, alias: str, collection: str) -> SourceInfo:
    stretch: tuple[float, ...] = tuple(getattr(src, "stretch", None) or (0.0, 255.0))
    vmin, vmax = (stretch[0], stretch[1]) if len(stretch) >= 2 else (0.0, 255.0)
    gamma = getattr(src, "gamma", None) or (stretch[2] if len(stretch) > 2 else 1.0)
    cloud = getattr(src, "cloud", None)
    bits = getattr(cloud, "mask_bits", None) or ()
    return SourceInfo(
        alias=alias,
        collection=str(getattr(src, "collection", None) or collection),
        bands=tuple(getattr(src, "bands", None) or ("R", "G", "B")),
        vmin=_triple(vmin, 0.0),
        vmax=_triple(vmax, 255.0),
        gamma=float(gamma or 1.0),
        backend=str(getattr(src, "backend", None) or "earthengine"),
        location=getattr(src, "location", None),
        cloud_property=getattr(cloud, "scene_property", None),
        cloud_max=getattr(cloud, "max_scene_percent", None),
        cloud_mask_band=getattr(cloud, "mask_band", None),
        cloud_mask_bits=tuple(int(b) for b in bits),
    )


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


_BACKENDS: dict[BackendConfig, Backend] = {}
_LOCK = threading.Lock()


def get_backend(config: BackendConfig) -> Backend:
    """This process's backend for ``config``, opened on first use."""
    with _LOCK:
        backend = _BACKENDS.get(config)
        if backend is None:
            limits = process_limits(config.limits)
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
            _BACKENDS[config] = backend
        return backend


def close_backends() -> None:
    """Close every backend this process opened and forget resolved sources (tests)."""
    with _LOCK:
        for backend in _BACKENDS.values():
            backend.close()
        _BACKENDS.clear()
    clear_source_cache()
