"""``skyscript-build extract``: an OSM PBF -> groundable objects as GeoParquet parts."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "extract the groundable OSM objects of a .osm.pbf file into GeoParquet parts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, one per field of ``ExtractConfig``."""
    parser.add_argument("input", type=Path, metavar="INPUT.osm.pbf", help="the OSM PBF file")
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
        help="worker processes; 0 = one per shard up to the cores (0), 1 = in this process",
    )
    parser.add_argument(
        "--location-index",
        default="auto",
        help="osmium node-location index: auto (memory up to 256 MiB of input, then a file), "
        "flex_mem, sparse_mem_array, sparse_file_array or dense_file_array (auto)",
    )
    parser.add_argument(
        "--index-dir", type=Path, help="folder for a file-backed node index (OUT/_tmp)"
    )
    parser.add_argument(
        "--rows-per-part", type=int, default=1_000_000, help="most rows per part (1000000)"
    )
    parser.add_argument(
        "--force", action="store_true", help="extract again even if OUT is up to date"
    )
    parser.add_argument(
        "--scheduler", default=None, help="address of a Dask scheduler to run the shards on"
    )


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    from ..extract import ExtractConfig, run_extract

    config = ExtractConfig(
        input=args.input,
        out=args.out,
        tag_filter=args.tag_filter,
        workers=args.workers,
        location_index=args.location_index,
        index_dir=args.index_dir,
        rows_per_part=args.rows_per_part,
        force=args.force,
        scheduler=args.scheduler,
    )
    result = run_extract(config)
    print(result.summary())
    return 0
