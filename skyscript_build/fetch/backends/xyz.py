"""Tile-server backend: an XYZ URL template (``https://host/{z}/{x}/{y}.png``).

The zoom is the coarsest whose Web Mercator pixel at the tile's latitude is no larger than the
request's GSD (capped at ``MAX_ZOOM``). The XYZ tiles covering the request are fetched (through
the run's concurrency and rate caps, with retries, and a small in-process cache since
neighbouring requests share tiles), stitched, and warped (bilinear) into the request's projected
grid. Missing tiles (HTTP 404/204) are no data; transparent pixels are no data.

Tile servers do not say when their imagery was taken: the acquisition time recorded is
1 January 00:00 UTC of the request's first year, and the image id is ``host/z``.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import numpy as np
import requests
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject, transform_bounds

from image_sources import ImageSource

from ...errors import BackendError
from . import BackendConfig
from .base import RETRYABLE_REASONS, Backend, FetchError, TileRequest, TileResult, call_with_retries
from .limits import Limits

__all__ = ["XyzBackend", "zoom_for_gsd", "TILE_SIZE", "MAX_ZOOM"]

log = logging.getLogger(__name__)

TILE_SIZE = 256
MAX_ZOOM = 22
EARTH_RADIUS = 6378137.0
ORIGIN = math.pi * EARTH_RADIUS  # half the Web Mercator world width, metres
CACHE_TILES = 512


def zoom_for_gsd(gsd: float, lat: float) -> int:
    """The coarsest zoom whose pixel at latitude ``lat`` is at most ``gsd`` metres."""
    ground_res0 = 2 * ORIGIN / TILE_SIZE * math.cos(math.radians(lat))
    return max(0, min(MAX_ZOOM, math.ceil(math.log2(ground_res0 / gsd) - 1e-9)))


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


class XyzBackend(Backend):
    """Tiles from an XYZ tile server, stitched and warped to each request's grid."""

    name = "xyz"

    def __init__(self, config: BackendConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self._cache: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = "skyscript-build"
        return session

    def _template(self, alias: str) -> str:
        template = self.config.location or self.config.source(alias).location
        if not template or not all(p in template for p in ("{z}", "{x}", "{y}")):
            raise BackendError(
                f"image source {alias} needs an XYZ URL template with {{z}}, {{x}} and {{y}} "
                f"(--location, or the source's location in a pipeline's source_definitions), got {template!r}"
            )
        return template

    def _get_tile(self, url: str) -> np.ndarray | None:
        """One XYZ tile as (256, 256, 4) uint8 RGBA, None when the server has none."""
        with self._cache_lock:
            if url in self._cache:
                self._cache.move_to_end(url)
                return self._cache[url]
        with self.limits.slot():
            try:
                response = self._session().get(url, timeout=self.config.timeout_s)
            except requests.Timeout as e:
                raise FetchError("timeout", str(e), retryable=True) from None
            except requests.RequestException as e:
                raise FetchError("connection", type(e).__name__, retryable=True) from None
        status = response.status_code
        if status in (204, 404):
            tile = None
        elif status == 429:
            raise FetchError("http-429", retryable=True, retry_after=_retry_after(response))
        elif status >= 500:
            raise FetchError(
                "http-5xx", f"{status}", retryable=True, retry_after=_retry_after(response)
            )
        elif status != 200:
            raise FetchError(f"http-{status}", "tile server refused the request")
        else:
            try:
                with Image.open(io.BytesIO(response.content)) as im:
                    tile = np.asarray(im.convert("RGBA"))
            except (OSError, ValueError) as e:
                raise FetchError("corrupt", f"undecodable tile ({e})", retryable=True) from None
            if tile.shape[:2] != (TILE_SIZE, TILE_SIZE):
                raise FetchError("corrupt", f"tile of size {tile.shape[:2]}", retryable=True)
        with self._cache_lock:
            self._cache[url] = tile
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)
        return tile

    def check(self, sources: Sequence[ImageSource], samples: Sequence[TileRequest]) -> None:
        """Every source has a URL template, and the server answers one probe request (for the
        first tile of the first sample): no connection, a timeout or a refusal (401, 403, other
        4xx but 404) is a ``BackendError``; a busy or failing server (429, 5xx) a warning."""
        for source in sources:
            self._template(source.alias)
        for request in samples[:1]:
            template = self._template(request.alias)
            z, (x0, _, y0, _) = self._tile_range(request)
            url = template.format(z=z, x=x0, y=y0)
            host = urlsplit(template).netloc or template
            try:
                call_with_retries(functools.partial(self._get_tile, url), self.config.retry)
            except FetchError as e:
                if e.reason in ("http-429", "http-5xx"):
                    log.warning("tile server %s is busy or failing (%s): going on", host, e.reason)
                elif e.reason in ("timeout", "connection"):
                    raise BackendError(
                        f"cannot reach the tile server {host} ({e.reason})"
                    ) from None
                else:
                    raise BackendError(
                        f"the tile server {host} refused the probe request for {url} ({e.reason})"
                    ) from None

    @staticmethod
    def _tile_range(request: TileRequest) -> tuple[int, tuple[int, int, int, int]]:
        """The zoom and the XYZ tiles (x0, x1, y0, y1, inclusive) covering ``request``."""
        lat = (request.south + request.north) / 2
        z = zoom_for_gsd(request.gsd, lat)
        left, bottom, right, top = transform_bounds(request.crs, "EPSG:3857", *request.grid.bounds)
        span = 2 * ORIGIN / 2**z
        n = 2**z
        x0 = max(0, math.floor((left + ORIGIN) / span))
        x1 = min(n - 1, math.floor((right + ORIGIN) / span))
        y0 = max(0, math.floor((ORIGIN - top) / span))
        y1 = min(n - 1, math.floor((ORIGIN - bottom) / span))
        return z, (x0, x1, y0, y1)

    def fetch(self, request: TileRequest) -> TileResult:
        template = self._template(request.alias)
        z, (x0, x1, y0, y1) = self._tile_range(request)
        span = 2 * ORIGIN / 2**z
        mosaic = np.zeros((4, (y1 - y0 + 1) * TILE_SIZE, (x1 - x0 + 1) * TILE_SIZE), np.uint8)
        attempts = 0
        any_tile = False
        for ty in range(y0, y1 + 1):
            for tx in range(x0, x1 + 1):
                url = template.format(z=z, x=tx, y=ty)
                try:
                    tile, n_attempts = call_with_retries(
                        functools.partial(self._get_tile, url), self.config.retry
                    )
                except FetchError as e:
                    attempts += getattr(e, "attempts", 1)
                    retry_later = e.retryable or e.reason in RETRYABLE_REASONS
                    result_cls = TileResult.failed if retry_later else TileResult.skipped
                    return result_cls(e.reason, attempts=attempts, detail=e.detail)
                attempts += n_attempts
                if tile is not None:
                    any_tile = True
                    r, c = (ty - y0) * TILE_SIZE, (tx - x0) * TILE_SIZE
                    mosaic[:, r : r + TILE_SIZE, c : c + TILE_SIZE] = np.moveaxis(tile, -1, 0)
        if not any_tile:
            return TileResult.skipped("no-image", attempts=attempts)
        res = span / TILE_SIZE
        src_transform = Affine(res, 0, x0 * span - ORIGIN, 0, -res, ORIGIN - y0 * span)
        out = np.zeros((4, request.height, request.width), np.uint8)
        reproject(
            mosaic,
            out,
            src_transform=src_transform,
            src_crs="EPSG:3857",
            dst_transform=Affine(*request.transform),
            dst_crs=request.crs,
            resampling=Resampling.bilinear,
        )
        valid = out[3] > 127
        rgb = np.ascontiguousarray(np.moveaxis(out[:3], 0, -1))
        rgb[~valid] = 0
        year = request.years[0] if request.years else datetime.now(UTC).year
        return TileResult(
            "ok",
            rgb=rgb,
            valid=valid,
            image_id=f"{urlsplit(template).netloc}/{z}",
            acquisition_time=datetime(year, 1, 1, tzinfo=UTC),
            year=year,
            attempts=attempts,
        )

    def close(self) -> None:
        with self._cache_lock:
            self._cache.clear()
