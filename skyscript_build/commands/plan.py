"""``skyscript-build plan``: objects -> tile requests (one per image to fetch)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import ConfigError

HELP = "choose image source, tile box, year and surroundings for each object"


def _years(text: str) -> tuple[int, ...]:
    m = re.fullmatch(r"\s*(\d{4})\s*(?:-\s*(\d{4})\s*)?", text)
    if not m:
        raise ConfigError(f"--years '{text}' is not YYYY or YYYY-YYYY (e.g. 2019-2022)")
    return (int(m.group(1)), int(m.group(2))) if m.group(2) else (int(m.group(1)),)


def _sources(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, one per PlanConfig field."""
    parser.add_argument("--objects", required=True, type=Path, help="extract's objects folder")
    parser.add_argument("--out", required=True, type=Path, help="requests folder to write")
    parser.add_argument(
        "--sources", default="", help="image source aliases, comma-separated (default: all)"
    )
    parser.add_argument("--years", default="", help="allowed years, YYYY or YYYY-YYYY")
    parser.add_argument("--seed", type=int, default=0, help="seed of shifts and sampling")
    parser.add_argument("--min-px", type=int, default=256, help="smallest tile side (pixels)")
    parser.add_argument("--max-px", type=int, default=1024, help="largest tile side (pixels)")
    parser.add_argument("--point-px", type=int, default=512, help="tile side of points/lines")
    parser.add_argument(
        "--margin", type=float, default=0.1, help="margin around areas, fraction of extent"
    )
    parser.add_argument(
        "--shift", type=float, default=0.8, help="how far off-centre (0 centred .. 1 edge)"
    )
    parser.add_argument(
        "--per-tag-cap", type=int, default=None, help="most objects per key=value tag"
    )
    parser.add_argument(
        "--max-surrounding", type=int, default=50, help="most surrounding objects per tile"
    )
    parser.add_argument("--max-requests", type=int, default=None, help="most requests")
    parser.add_argument(
        "--tag-filter", default="default", help="groundability table (name or CSV path)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the fetch's cost, write nothing"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="threads (0: one per core); the output is the same for any number",
    )
    parser.add_argument(
        "--shard-deg",
        type=float,
        default=0.05,
        help="side (degrees) of the grid blocks that partition the objects for the second pass",
    )
    parser.add_argument(
        "--partition-objects",
        type=int,
        default=100_000,
        help="a block with more objects is cut into quarters (bounds a task's memory)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        help="address of a Dask scheduler to run the tasks on (default: threads here)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the plan stage and print its summary (and, with --dry-run, the cost table)."""
    from ..plan import PlanConfig, run_plan

    config = PlanConfig(
        objects=args.objects,
        out=args.out,
        sources=_sources(args.sources),
        years=_years(args.years) if args.years else (),
        seed=args.seed,
        min_px=args.min_px,
        max_px=args.max_px,
        point_px=args.point_px,
        margin=args.margin,
        shift=args.shift,
        per_tag_cap=args.per_tag_cap,
        max_surrounding=args.max_surrounding,
        max_requests=args.max_requests,
        tag_filter=args.tag_filter,
        dry_run=args.dry_run,
        workers=args.workers,
        shard_deg=args.shard_deg,
        partition_objects=args.partition_objects,
        scheduler=args.scheduler,
    )
    result = run_plan(config)
    if config.dry_run:
        for line in result.estimate_lines():
            print(line)
    print(result.summary())
    return 0
