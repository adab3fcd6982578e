"""``skyscript-build caption``: rule-based captions from meta files into one CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "caption a dataset's meta*/ pickles (ours or SkyScript's released ones) into a CSV"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, one per field of ``CaptionConfig``."""
    parser.add_argument(
        "--dataset", type=Path, required=True, help="dataset folder holding meta2/, meta3/, ..."
    )
    parser.add_argument(
        "--out", type=Path, help="caption CSV (default: DATASET/SkyScript_captions.csv)"
    )
    parser.add_argument(
        "--rules",
        help="caption rules: a .yaml file merged over the defaults, a bundled name "
        "(default), or a Python function module:function / file.py:function taking "
        "(center_tags, surrounding_tags) and returning (title, title_multi_objects)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="worker processes; 0 = one per core (0)"
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="an existing Dask scheduler (tcp://host:8786): the chunks run on its workers, "
        "which must see the dataset folder (and --out's folder) under the same path",
    )
    parser.add_argument("--chunk-size", type=int, default=4096, help="meta files per task (4096)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="caption again even if the CSV is up to date (same meta and image folders, rules "
        "and code)",
    )
    parser.add_argument(
        "--meta-only",
        action="store_true",
        help="write a row for every meta file without looking for its image (e.g. SkyScript's "
        "released meta files without the images); by default a meta file whose image "
        "images{k}/<key>.jpg is missing gets no row, and is counted",
    )


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    from ..caption import CaptionConfig, run_caption

    config = CaptionConfig(
        dataset=args.dataset,
        out=args.out,
        rules=args.rules,
        workers=args.workers,
        scheduler=args.scheduler,
        chunk_size=args.chunk_size,
        force=args.force,
        meta_only=args.meta_only,
    )
    result = run_caption(config)
    print(result.summary())
    return 0
