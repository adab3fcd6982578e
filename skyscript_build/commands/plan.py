"""``skyscript-build plan``: objects -> tile requests (one per image to fetch)."""

from __future__ import annotations

import argparse

from ..plan import PlanConfig, run_plan
from ..settings import config_from_args

HELP = "choose image source, tile box, year and surroundings for each object"
CONFIG = PlanConfig


def main(args: argparse.Namespace) -> int:
    """Run the plan stage and print its summary (and, with --dry-run, the cost table)."""
    config = config_from_args(CONFIG, args)
    result = run_plan(config)
    if config.dry_run:
        for line in result.estimate_lines():
            print(line)
    print(result.summary())
    return 0
