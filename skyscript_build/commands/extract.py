"""``skyscript-build extract``: OSM PBF file(s) -> groundable objects as GeoParquet parts."""

from __future__ import annotations

import argparse

from ..extract import ExtractConfig, run_extract
from ..settings import config_from_args

HELP = "extract the groundable OSM objects of .osm.pbf files into GeoParquet parts"
CONFIG = ExtractConfig


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    result = run_extract(config_from_args(CONFIG, args))
    print(result.summary())
    return 0
