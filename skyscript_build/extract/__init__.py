"""The extract stage: OSM PBF file(s) -> ``objects/part-*.parquet`` (GeoParquet, EPSG:4326).

One row per groundable object: tagged nodes as points, ways as lines, closed ways and
multipolygon relations as areas (see ``_rules.is_area``). The schema is in
docs/architecture.md. Entry point: ``run_extract(ExtractConfig(...))``.
"""

from __future__ import annotations

from ._parquet import OSM_CREDIT
from .stage import ExtractConfig, ExtractResult, resolve_inputs, run_extract

__all__ = ["ExtractConfig", "ExtractResult", "resolve_inputs", "run_extract", "OSM_CREDIT"]
