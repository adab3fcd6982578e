"""``skyscript-build filter``: CLIP scores, top-k% training CSVs, val/test splits."""

from __future__ import annotations

import argparse

from ..filter import FilterConfig, run_filter
from ..settings import config_from_args

HELP = "score image-caption pairs with CLIP; write top-k%% train, val and test CSVs"
CONFIG = FilterConfig


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    result = run_filter(config_from_args(CONFIG, args))
    print(result.summary())
    return 0
