"""Pipeline files: one YAML file describes a whole dataset build; ``run_pipeline`` runs it.

``stage``: ``run_pipeline`` (the stages in order, one Dask client for those on Dask); beside it
``_config`` (the YAML into a frozen ``PipelineConfig``), ``_schema`` (its validation) and
``_stages`` (each stage's config from the pipeline).
"""

from ._config import (
    BACKEND_TYPES,
    STAGES,
    FilterSection,
    PipelineConfig,
    Section,
    json_schema,
    load_pipeline,
    pipeline_keys,
)
from .stage import PipelineResult, StageOutcome, run_pipeline, select_stages

__all__ = [
    "STAGES",
    "BACKEND_TYPES",
    "Section",
    "FilterSection",
    "PipelineConfig",
    "pipeline_keys",
    "json_schema",
    "load_pipeline",
    "StageOutcome",
    "PipelineResult",
    "select_stages",
    "run_pipeline",
]
