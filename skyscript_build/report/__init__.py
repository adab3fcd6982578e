"""The build's HTML report (``stage``; ``_data`` reads the build's files)."""

from .stage import ReportConfig, ReportResult, find_dataset_files, run_report

__all__ = [
    "ReportConfig",
    "ReportResult",
    "run_report",
    "find_dataset_files",
]
