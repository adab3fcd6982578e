"""``skyscript-build polish``: rewrite rule captions with a model behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse

from ..polish import PolishConfig, run_polish
from ..settings import config_from_args

HELP = "rewrite rule captions into natural language with any OpenAI-compatible chat endpoint"
CONFIG = PolishConfig


def main(args: argparse.Namespace) -> int:
    """Run the stage; print its summary. Exit 1 when some requests failed (rerun to retry)."""
    config = config_from_args(CONFIG, args)
    result = run_polish(config)
    print(result.summary())
    if result.failed_requests:
        print(
            f"{result.failed_requests} requests failed; their rows keep the rule caption and "
            "are not cached: run the same command again to retry them"
        )
        return 1
    return 0
