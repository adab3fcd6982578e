"""The plan stage: ``objects/`` -> ``requests/part-*.parquet``, one row per image to fetch.

``stage``: ``PlanConfig``, ``PlanResult``, ``run_plan`` (the two passes); the private modules
beside it: ``_objects`` (reading), ``_scan`` and ``_scanfile`` (pass 1), ``_partition`` (pass 2),
``_choose``, ``_geo``, ``_surround``, ``_output``.
"""

from .stage import JPEG_BYTES_PER_PIXEL, MARKER, SCHEMA, PlanConfig, PlanResult, run_plan

__all__ = [
    "PlanConfig",
    "PlanResult",
    "run_plan",
    "SCHEMA",
    "JPEG_BYTES_PER_PIXEL",
    "MARKER",
]
