"""``skyscript-build fetch``: requests -> images, meta pickles and the manifest."""

from __future__ import annotations

import argparse
import logging

from ..fetch._blocks import BLOCK_MODES
from ..fetch._quality import JPEG_ENCODERS, QualityConfig
from ..fetch.backends import BACKENDS
from ..fetch.stage import FORMATS, FetchConfig, run_fetch

HELP = "fetch the planned image tiles: images{k}/*.jpg, meta{k}/*.pickle, manifest/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fetch flags (one per ``FetchConfig`` field)."""
    parser.epilog = (
        "Exit status: 0 when every tile is ok or permanently skipped, 1 when some tiles failed "
        "with a retryable reason (run the same command again to retry only those), 2 for a "
        "usage, input or credentials error."
    )
    parser.add_argument("--requests", required=True, help="the plan's requests/ folder")
    parser.add_argument("--out", required=True, help="the dataset folder to write")
    parser.add_argument(
        "--backend", choices=BACKENDS, default=None, help="imagery backend (default: each source's)"
    )
    parser.add_argument("--ee-url", default=None, help="Earth Engine endpoint (an emulator's URL)")
    parser.add_argument("--project", default=None, help="Google Cloud project for Earth Engine")
    parser.add_argument(
        "--key-file",
        default=None,
        help="service-account key JSON (default: $EE_SERVICE_ACCOUNT_KEY, else default credentials)",
    )
    parser.add_argument("--location", default=None, help="raster folder or XYZ URL template")
    parser.add_argument("--parts", type=int, default=6, help="images{k}/meta{k} folders (k=2..N+1)")
    parser.add_argument("--format", choices=FORMATS, default="files", help="output layout")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (0: one per core)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    parser.add_argument("--concurrency", type=int, default=40, help="requests in flight, run-wide")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second, run-wide")
    parser.add_argument("--shard-size", type=int, default=200, help="requests per shard")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--max-attempts", type=int, default=6, help="tries per request")
    parser.add_argument(
        "--allow-next-year",
        action="store_true",
        help="when a year has no imagery, try the request's next candidate year",
    )
    parser.add_argument("--max-nodata", type=float, default=0.2, help="largest no-data fraction")
    parser.add_argument("--max-cloud", type=float, default=0.3, help="largest cloud fraction")
    blocks = parser.add_argument_group(
        "block requests",
        "Earth Engine: neighbouring tiles of one image are fetched with one request for their "
        "block where the cost model (overhead + cost per megapixel of a request) says it pays; "
        "tiles are cut from it locally, identical to their own requests.",
    )
    blocks.add_argument(
        "--blocks", choices=BLOCK_MODES, default="auto", help="auto: where they pay; off: per tile"
    )
    blocks.add_argument(
        "--block-overhead-ms", type=float, default=500.0, help="cost model: ms per request"
    )
    blocks.add_argument(
        "--block-ms-per-mpx", type=float, default=100.0, help="cost model: ms per megapixel"
    )
    blocks.add_argument(
        "--block-max-px", type=int, default=2048, help="largest block side in pixels (<= 32768)"
    )
    blocks.add_argument(
        "--block-memory-mb",
        type=int,
        default=512,
        help="megabytes of block pixels a process holds at once",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=90, help="quality of the JPEGs written (1-100)"
    )
    parser.add_argument(
        "--jpeg-encoder",
        choices=list(JPEG_ENCODERS),
        default="pillow",
        help="JPEG encoder (changing it or the quality refetches tiles encoded otherwise)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also decode every JPEG and load every pickle of earlier runs (a rerun always "
        "checks each file's presence and size); damaged files are fetched again",
    )


def main(args: argparse.Namespace) -> int:
    """Run the fetch stage and print its summary."""
    config = FetchConfig(
        requests=args.requests,
        out=args.out,
        backend=args.backend,
        ee_url=args.ee_url,
        project=args.project,
        key_file=args.key_file,
        location=args.location,
        parts=args.parts,
        format=args.format,
        workers=args.workers,
        scheduler=args.scheduler,
        concurrency=args.concurrency,
        rate=args.rate,
        shard_size=args.shard_size,
        timeout_s=args.timeout,
        max_attempts=args.max_attempts,
        allow_next_year=args.allow_next_year,
        blocks=args.blocks,
        block_overhead_ms=args.block_overhead_ms,
        block_ms_per_mpx=args.block_ms_per_mpx,
        block_max_px=args.block_max_px,
        block_memory_mb=args.block_memory_mb,
        jpeg_quality=args.jpeg_quality,
        jpeg_encoder=args.jpeg_encoder,
        verify=args.verify,
        quality=QualityConfig(max_nodata=args.max_nodata, max_cloud=args.max_cloud),
    )
    result = run_fetch(config)
    print(result.summary())
    logging.getLogger(__name__).debug("fetch result: %s", result)
    return 0 if result.failed == 0 else 1
