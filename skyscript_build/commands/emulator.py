"""``skyscript-build emulator``: serve local GeoTIFFs as Earth Engine collections."""

from __future__ import annotations

import argparse
import json

HELP = "run the local Earth Engine emulator (the real ee client talks to it) until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's flags."""
    parser.add_argument(
        "--collections", required=True, help="collections YAML: collection id -> images"
    )
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument(
        "--latency-ms", type=float, default=0, help="fixed delay added to each API request"
    )
    parser.add_argument(
        "--latency-ms-per-mpx",
        type=float,
        default=0,
        help="more delay per megapixel of a computePixels request (latency = BASE + COST x Mpx)",
    )
    parser.add_argument(
        "--fault",
        default="",
        help="fault rates, e.g. 429:0.1,500:0.05,503:0.05,timeout:0.02,truncate:0.02,html:0.01,"
        "memory:0.01",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault sequence")
    parser.add_argument(
        "--stall-s", type=float, default=30.0, help="how long a 'timeout' fault stalls"
    )
    parser.add_argument(
        "--retry-after", type=int, default=1, help="Retry-After seconds of a 429 fault"
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="computePixels size limit (default Earth Engine's 50331648)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="answer 429 past this many requests in flight (Earth Engine's quota: 40)",
    )
    parser.add_argument(
        "--max-rps", type=float, default=None, help="answer 429 past this many requests/s"
    )


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted; print the URL to pass to ee.Initialize(opt_url=...)."""
    from ..emulator import Emulator

    emulator = Emulator(
        args.collections,
        port=args.port,
        latency_ms=args.latency_ms,
        latency_ms_per_mpx=args.latency_ms_per_mpx,
        faults=args.fault,
        seed=args.seed,
        stall_s=args.stall_s,
        retry_after_s=args.retry_after,
        max_request_bytes=args.max_request_bytes,
        max_concurrent=args.max_concurrent,
        max_rps=args.max_rps,
    )
    emulator.start()
    try:
        collections = ", ".join(
            f"{cid} ({len(images)} images)" for cid, images in emulator.catalog.collections.items()
        )
        print(f"Earth Engine emulator on {emulator.url} serving {collections}", flush=True)
        print(
            f"use: ee.Initialize(credentials=AnonymousCredentials(), project='demo', "
            f"opt_url='{emulator.url}')  (Ctrl-C stops)",
            flush=True,
        )
        emulator.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
        print(f"emulator stopped: {json.dumps(emulator.stats.as_dict())}", flush=True)
    return 0
