"""The demo's synthetic orthophoto of the bundled OSM extract (``stage``; ``_osm``, ``_render``)."""

from .stage import (
    ATTRIBUTION,
    OrthophotoConfig,
    OrthophotoResult,
    render_orthophoto,
    run_orthophoto,
)

__all__ = [
    "OrthophotoConfig",
    "OrthophotoResult",
    "render_orthophoto",
    "run_orthophoto",
    "ATTRIBUTION",
]
