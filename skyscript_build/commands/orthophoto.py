"""``skyscript-build orthophoto``: render the demo's synthetic orthophoto from an OSM extract."""

from __future__ import annotations

import argparse

from ..orthophoto import OrthophotoConfig, render_orthophoto
from ..settings import config_from_args

HELP = "render a synthetic 0.5 m orthophoto from an OSM extract (for the demo's emulator)"
CONFIG = OrthophotoConfig


def main(args: argparse.Namespace) -> int:
    """Render and print the one-line summary."""
    print(render_orthophoto(config_from_args(CONFIG, args)).summary())
    return 0
