"""The fetch stage: ``requests/`` -> images, meta pickles and ``manifest/``.

``stage``: ``FetchConfig``, ``FetchResult``, ``run_fetch``; beside it ``_blocks`` (block requests),
``_writer`` (the dataset's files), ``_quality`` (tile checks, JPEG encoding) and ``backends``
(Earth Engine, local rasters, tile servers: one interface).
"""

from .stage import (
    FetchConfig,
    FetchResult,
    FetchShard,
    fetch_order,
    fetch_shard,
    iter_manifest,
    part_of,
    run_fetch,
)

__all__ = [
    "FetchConfig",
    "FetchResult",
    "FetchShard",
    "run_fetch",
    "fetch_shard",
    "fetch_order",
    "iter_manifest",
    "part_of",
]
