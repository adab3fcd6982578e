"""``skyscript-build fetch``: requests -> images, meta pickles and the manifest."""

from __future__ import annotations

import argparse
import logging

from ..fetch.stage import FetchConfig, run_fetch
from ..settings import config_from_args

HELP = "fetch the planned image tiles: images{k}/*.jpg, meta{k}/*.pickle, manifest/"
CONFIG = FetchConfig
EPILOG = (
    "Exit status: 0 when every tile is ok or permanently skipped, 1 when some tiles failed "
    "with a retryable reason (run the same command again to retry only those), 2 for a "
    "usage, input or credentials error."
)
GROUPS = {
    "block requests": "Earth Engine: neighbouring tiles of one image are fetched with one "
    "request for their block where the cost model (overhead + cost per megapixel of a request) "
    "says it pays; tiles are cut from it locally, identical to their own requests."
}


def main(args: argparse.Namespace) -> int:
    """Run the fetch stage and print its summary."""
    result = run_fetch(config_from_args(CONFIG, args))
    print(result.summary())
    logging.getLogger(__name__).debug("fetch result: %s", result)
    return 0 if result.failed == 0 else 1
