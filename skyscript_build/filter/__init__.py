"""The filter stage: caption CSV + images -> CLIP scores, top-k% train, val and test CSVs.

``stage``: ``FilterConfig``, ``FilterResult``, ``run_filter``; beside it ``_models`` (CLIP loading,
``clip_configs/``), ``_decode``, ``_scoring``, ``_store`` (scores.parquet), ``_selection``.
"""

from ._models import CLIP_CONFIG_DIR, get_clip_config, list_clip_configs
from .stage import SCORES_FILE, FilterConfig, FilterResult, output_names, run_filter, top_count

__all__ = [
    "FilterConfig",
    "FilterResult",
    "run_filter",
    "output_names",
    "list_clip_configs",
    "get_clip_config",
    "CLIP_CONFIG_DIR",
    "SCORES_FILE",
    "top_count",
]
