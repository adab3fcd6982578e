"""``skyscript-build report BUILD_DIR``: the build's static HTML report."""

from __future__ import annotations

import argparse

from ..report import ReportConfig, run_report
from ..settings import config_from_args

HELP = "write a static HTML report (counts, charts, samples) of a build folder"
CONFIG = ReportConfig


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, write the report, print the summary."""
    result = run_report(config_from_args(CONFIG, args))
    print(result.summary())
    return 0
