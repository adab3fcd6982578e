"""``skyscript-build extract``: OSM PBF file(s) -> groundable objects as GeoParquet parts."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "extract the groundable OSM objects of .osm.pbf files into GeoParquet parts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, one per field of ``ExtractConfig``."""
    parser.add_argument(
        "input",
        type=Path,
        nargs="+",
        metavar="INPUT",
        help="OSM PBF file(s) (.osm.pbf), folders of them, or quoted glob patterns "
        "('regions/*.osm.pbf'); several inputs (regional extracts that overlap at their "
        "borders) make one set of objects, each object once",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (objects/ of a build)"
    )
    parser.add_argument(
        "--tag-filter",
        default="default",
        metavar="NAME_OR_PATH",
        help="groundability table: a shipped name or a CSV file (default)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes; 0 = one per core (0), 1 = in this process",
    )
    parser.add_argument(
        "--task-mb",
        type=float,
        default=16.0,
        help="compressed input per task in MiB: each process's memory grows with it (16)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the node locations and other files the tasks share, removed at the "
        "end; on a cluster one every worker sees (OUT/_work)",
    )
    parser.add_argument(
        "--rows-per-part", type=int, default=1_000_000, help="most rows per part (1000000)"
    )
    parser.add_argument(
        "--force", action="store_true", help="extract again even if OUT is up to date"
    )
    parser.add_argument(
        "--scheduler", default=None, help="address of a Dask scheduler to run the tasks on"
    )


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    from ..extract import ExtractConfig, run_extract

    config = ExtractConfig(
        input=args.input,
        out=args.out,
        tag_filter=args.tag_filter,
        workers=args.workers,
        task_mb=args.task_mb,
        work_dir=args.work_dir,
        rows_per_part=args.rows_per_part,
        force=args.force,
        scheduler=args.scheduler,
    )
    result = run_extract(config)
    print(result.summary())
    return 0
