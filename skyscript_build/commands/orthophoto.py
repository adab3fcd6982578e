"""``skyscript-build orthophoto``: render the demo's synthetic orthophoto from an OSM extract."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "render a synthetic 0.5 m orthophoto from an OSM extract (for the demo's emulator)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The orthophoto's flags (one per OrthophotoConfig field)."""
    parser.add_argument("--pbf", type=Path, required=True, help="the OSM extract (.osm.pbf)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--gsd", type=float, default=0.5, help="metres per pixel")
    parser.add_argument("--crs", default="EPSG:3067", help="projected CRS of the GeoTIFF")
    parser.add_argument("--seed", type=int, default=0, help="seed of the texture")
    parser.add_argument(
        "--collection", default="Finland/SMK/V/50cm", help="collection id to register"
    )
    parser.add_argument(
        "--time-start", default="2019-06-15T10:30:00Z", help="acquisition time to register"
    )
    parser.add_argument("--force", action="store_true", help="render even if up to date")


def main(args: argparse.Namespace) -> int:
    """Render and print the one-line summary."""
    from ..orthophoto import OrthophotoConfig, render_orthophoto

    config = OrthophotoConfig(
        pbf=args.pbf,
        out=args.out,
        gsd=args.gsd,
        crs=args.crs,
        seed=args.seed,
        collection=args.collection,
        time_start=args.time_start,
        force=args.force,
    )
    print(render_orthophoto(config).summary())
    return 0
