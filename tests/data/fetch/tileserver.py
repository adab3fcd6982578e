"""A local XYZ tile server for the tests: Web Mercator PNG tiles warped from a GeoTIFF.

``TileServer(raster)`` serves ``/{z}/{x}/{y}.png`` on 127.0.0.1 (a free port); pixels outside
the raster are transparent, tiles wholly outside are 404. ``fail_first=N`` answers the first N
requests of every tile with 429 (Retry-After: 0); ``hits`` counts requests per path.
"""

from __future__ import annotations

import io
import math
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT

ORIGIN = math.pi * 6378137.0


class TileServer:
    """Context manager: ``with TileServer(tif) as ts: ts.template``."""

    def __init__(self, raster: Path, fail_first: int = 0) -> None:
        self.raster = Path(raster)
        self.fail_first = fail_first
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                with server._lock:
                    server.hits[self.path] += 1
                    n = server.hits[self.path]
                if n <= server.fail_first:
                    self.send_response(429)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    z, x, y = (int(p) for p in self.path.strip("/").removesuffix(".png").split("/"))
                except ValueError:
                    self.send_error(400)
                    return
                body = server.render(z, x, y)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def template(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{{z}}/{{x}}/{{y}}.png"

    def render(self, z: int, x: int, y: int) -> bytes | None:
        """The PNG of tile (z, x, y), None when it has no data at all."""
        span = 2 * ORIGIN / 2**z
        res = span / 256
        transform = Affine(res, 0, x * span - ORIGIN, 0, -res, ORIGIN - y * span)
        with (
            rasterio.open(self.raster) as ds,
            WarpedVRT(
                ds,
                crs="EPSG:3857",
                transform=transform,
                width=256,
                height=256,
                resampling=Resampling.bilinear,
                add_alpha=True,
            ) as vrt,
        ):
            rgb = vrt.read([1, 2, 3])
            alpha = vrt.read(vrt.count)
        if not alpha.any():
            return None
        rgba = np.concatenate([rgb, alpha[None]], axis=0)
        buf = io.BytesIO()
        Image.fromarray(np.moveaxis(rgba, 0, -1), "RGBA").save(buf, format="PNG")
        return buf.getvalue()

    def __enter__(self) -> TileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
