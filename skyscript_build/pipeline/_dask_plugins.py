"""Dask plugins of ``run`` (imported only when a run uses Dask)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ._stages import register_sources

__all__ = ["SourcesPlugin"]


class SourcesPlugin(WorkerPlugin):
    """Registers a pipeline's own image sources (``source_definitions``) on every worker.

    The catalog lives in each process; without this a worker would not know a source that the
    pipeline file defines. A worker started later (after a loss) gets them too.
    """

    name = "skyscript-build-sources"

    def __init__(self, definitions: Mapping[str, Mapping[str, Any]]) -> None:
        self.definitions = {k: dict(v) for k, v in definitions.items()}

    def setup(self, worker: Any) -> None:
        register_sources(self.definitions)
        with contextlib.suppress(ImportError):
            from ..fetch.backends import clear_source_cache

            clear_source_cache()
