"""``skyscript-build caption``: rule-based captions from meta files into one CSV."""

from __future__ import annotations

import argparse

from ..caption import CaptionConfig, run_caption
from ..settings import config_from_args

HELP = "caption a dataset's meta*/ pickles (ours or SkyScript's released ones) into a CSV"
CONFIG = CaptionConfig


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    result = run_caption(config_from_args(CONFIG, args))
    print(result.summary())
    return 0
