"""``skyscript-build report BUILD_DIR``: the build's static HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a static HTML report (counts, charts, samples) of a build folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="the build folder")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default BUILD_DIR/report)"
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="dataset folder (default BUILD_DIR/dataset)"
    )
    parser.add_argument("--samples", type=int, default=12, help="sample images shown (12)")
    parser.add_argument("--top-tags", type=int, default=50, help="tag keys listed (50)")


def main(args: argparse.Namespace) -> int:
    from ..report import ReportConfig, run_report

    config = ReportConfig(
        build_dir=args.build_dir,
        out=args.out,
        dataset_dir=args.dataset,
        samples=args.samples,
        top_tags=args.top_tags,
    )
    result = run_report(config)
    print(result.summary())
    return 0
