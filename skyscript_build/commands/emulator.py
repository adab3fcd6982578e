"""``skyscript-build emulator``: serve local GeoTIFFs as Earth Engine collections."""

from __future__ import annotations

import argparse
import json

from ..emulator import Emulator, EmulatorConfig
from ..settings import config_from_args

HELP = "run the local Earth Engine emulator (the real ee client talks to it) until Ctrl-C"
CONFIG = EmulatorConfig


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted; print the URL to pass to ee.Initialize(opt_url=...)."""
    emulator = Emulator.from_config(config_from_args(CONFIG, args))
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
