"""``skyscript-build run PIPELINE``: every stage of a pipeline file, in order."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run a pipeline file's stages in order (extract, plan, fetch, caption, filter, report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..pipeline import STAGES

    parser.add_argument("pipeline", type=Path, metavar="PIPELINE", help="a pipeline YAML file")
    parser.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        default=None,
        metavar="STAGE",
        help=f"run only this stage (repeatable; one of {', '.join(STAGES)}); default: all",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="an existing Dask scheduler (tcp://host:8786), overriding the pipeline's cluster",
    )


def main(args: argparse.Namespace) -> int:
    from ..pipeline import StageOutcome, load_pipeline, run_pipeline

    config = load_pipeline(args.pipeline)

    def show(outcome: StageOutcome) -> None:
        print(outcome.summary(), flush=True)

    result = run_pipeline(config, stages=args.stage, scheduler=args.scheduler, on_stage=show)
    print(result.summary())
    if config.synthetic_imagery:
        print("note: the imagery is synthetic (the Earth Engine emulator), not real photos")
    if (
        config.filter is not None
        and config.filter.random_weights
        and (not args.stage or "filter" in args.stage)
    ):
        print("note: the CLIP model has random weights: its ranking is meaningless")
    return 0
