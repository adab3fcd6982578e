"""The caption stage: SkyScript meta files -> rule-based caption CSV.

- ``rules``: the caption rules (data: ``default_rules.yaml``; or a Python function);
- ``worker``: finding meta folders, captioning one chunk of files into a chunk CSV;
- ``stage``: ``CaptionConfig``, ``run_caption`` (parallel, streaming, atomic output).
"""

from ._rules import (
    CaptionFunc,
    CaptionRules,
    RuleCaptioner,
    list_rules,
    load_rules,
    make_captioner,
    resolve_rules,
)
from ._worker import find_meta_folders
from .stage import DEFAULT_CSV_NAME, CaptionConfig, CaptionResult, run_caption, stats_path

__all__ = [
    "CaptionConfig",
    "CaptionResult",
    "CaptionFunc",
    "CaptionRules",
    "RuleCaptioner",
    "DEFAULT_CSV_NAME",
    "find_meta_folders",
    "list_rules",
    "load_rules",
    "make_captioner",
    "resolve_rules",
    "run_caption",
    "stats_path",
]
