"""Local-raster backend: a folder of GeoTIFF/COG files under an alias, warped to the tile grid.

The folder is the source's ``location`` (its catalog entry) or ``--location``. Every
``*.tif``/``*.tiff`` in it is one image; its id is the file stem. Its acquisition time is
read, in order, from the GDAL metadata tag ``ACQUISITION_TIME`` (ISO 8601, UTC unless it has an
offset), the TIFF tag ``TIFFTAG_DATETIME`` (``YYYY:MM:DD HH:MM:SS``, taken as UTC), else the
file's modification time. A request uses the images of its year that cover the tile, latest
first, mosaicked in the tile's projected grid (``WarpedVRT``, bilinear); the image covering most
of the tile names the result. Bands are matched by description to the source's band names,
else the first three bands are R, G, B.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from image_sources import ImageSource

from ...errors import BackendError
from . import BackendConfig
from .base import Backend, TileRequest, TileResult, stretch_to_uint8
from .limits import Limits

__all__ = ["RasterBackend", "RasterImage", "acquisition_time_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RasterImage:
    """One file of the folder."""

    path: Path
    image_id: str
    time: datetime
    crs: str
    bounds: tuple[float, float, float, float]
    band_indexes: tuple[int, ...]


def _parse_time(text: str) -> datetime | None:
    text = text.strip()
    for parse in (
        lambda t: datetime.fromisoformat(t.replace("Z", "+00:00")),
        lambda t: datetime.strptime(t, "%Y:%m:%d %H:%M:%S"),
    ):
        try:
            value = parse(text)
        except ValueError:
            continue
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return None


def acquisition_time_of(path: Path, tags: dict[str, str]) -> datetime:
    """The acquisition time of a raster file (see the module docstring for the order)."""
    for name in ("ACQUISITION_TIME", "acquisition_time", "TIFFTAG_DATETIME"):
        if name in tags:
            value = _parse_time(tags[name])
            if value is not None:
                return value
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)


def _band_indexes(ds: rasterio.DatasetReader, bands: tuple[str, ...]) -> tuple[int, ...]:
    names = [d or "" for d in ds.descriptions]
    if all(b in names for b in bands):
        return tuple(names.index(b) + 1 for b in bands)
    if ds.count >= 3:
        return (1, 2, 3)
    return (1, 1, 1)


class RasterBackend(Backend):
    """Tiles cut from local GeoTIFFs, reprojected to each request's grid."""

    name = "raster"

    def __init__(self, config: BackendConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self._index: dict[str, list[RasterImage]] = {}
        self._bounds_cache: dict[tuple[Path, str], tuple[float, float, float, float]] = {}
        self._lock = threading.Lock()

    def _folder(self, source: ImageSource) -> Path:
        location = self.config.location or source.location
        if not location:
            raise BackendError(
                f"image source {source.alias} has no raster folder: give --location DIR "
                "or set the source's location (a pipeline's source_definitions)"
            )
        folder = Path(location)
        if not folder.is_dir():
            raise BackendError(f"{folder}: raster folder of source {source.alias} does not exist")
        return folder

    def check(self, sources: Sequence[ImageSource], samples: Sequence[TileRequest]) -> None:
        """Every source's folder exists and holds readable GeoTIFFs (indexed here, once)."""
        for source in sources:
            self.images(source)

    def images(self, source: ImageSource) -> list[RasterImage]:
        """The indexed files of ``source``'s folder, latest first (built once)."""
        with self._lock:
            if source.alias in self._index:
                return self._index[source.alias]
            folder = self._folder(source)
            found = []
            for path in sorted([*folder.glob("*.tif"), *folder.glob("*.tiff")]):
                try:
                    with rasterio.open(path) as ds:
                        found.append(
                            RasterImage(
                                path=path,
                                image_id=path.stem,
                                time=acquisition_time_of(path, ds.tags()),
                                crs=ds.crs.to_string() if ds.crs else "",
                                bounds=tuple(ds.bounds),  # type: ignore[arg-type]
                                band_indexes=_band_indexes(ds, source.bands),
                            )
                        )
                except RasterioError as e:
                    log.warning("%s: skipped, not a readable raster (%s)", path, e)
            if not found:
                raise BackendError(f"{folder}: no GeoTIFF files (*.tif) for source {source.alias}")
            found.sort(key=lambda im: (im.time, im.image_id), reverse=True)
            self._index[source.alias] = found
            return found

    def _bounds_in(self, image: RasterImage, crs: str) -> tuple[float, float, float, float]:
        key = (image.path, crs)
        bounds = self._bounds_cache.get(key)
        if bounds is None:
            bounds = transform_bounds(image.crs, crs, *image.bounds, densify_pts=21)
            self._bounds_cache[key] = bounds
        return bounds

    def fetch(self, request: TileRequest) -> TileResult:
        source = self.config.source(request.alias)
        images = self.images(source)
        years = request.years if self.config.allow_next_year else request.years[:1]
        for year in years or (None,):
            candidates = [
                im
                for im in images
                if (year is None or im.time.year == year) and self._intersects(im, request)
            ]
            if candidates:
                try:
                    return self._mosaic(request, source, candidates, year)
                except RasterioError as e:
                    return TileResult.failed("read-error", attempts=1, detail=str(e))
        return TileResult.skipped("no-image", attempts=1)

    def _intersects(self, image: RasterImage, request: TileRequest) -> bool:
        left, bottom, right, top = self._bounds_in(image, request.crs)
        x_min, y_min, x_max, y_max = request.grid.bounds
        return left < x_max and right > x_min and bottom < y_max and top > y_min

    def _mosaic(
        self,
        request: TileRequest,
        source: ImageSource,
        candidates: list[RasterImage],
        year: int | None,
    ) -> TileResult:
        height, width = request.height, request.width
        transform = Affine(*request.transform)
        out: np.ndarray | None = None
        valid = np.zeros((height, width), dtype=bool)
        best: tuple[int, RasterImage] | None = None
        for image in candidates:
            with (
                rasterio.open(image.path) as ds,
                WarpedVRT(
                    ds,
                    crs=request.crs,
                    transform=transform,
                    width=width,
                    height=height,
                    resampling=Resampling.bilinear,
                    add_alpha=True,
                ) as vrt,
            ):
                data = vrt.read(list(image.band_indexes))
                mask = vrt.read(vrt.count) > 0
            if out is None:
                out = np.zeros_like(data)
            new = mask & ~valid
            n_new = int(new.sum())
            if n_new == 0:
                continue
            out[:, new] = data[:, new]
            valid |= new
            if best is None or n_new > best[0]:
                best = (n_new, image)
            if valid.all():
                break
        if best is None or out is None:
            return TileResult.skipped("no-image", attempts=1)
        low, high = source.stretch
        rgb = stretch_to_uint8(out, low, high, source.gamma or 1.0)
        rgb[~valid] = 0
        image = best[1]
        return TileResult(
            "ok",
            rgb=rgb,
            valid=valid,
            image_id=image.image_id,
            acquisition_time=image.time,
            year=image.time.year if year is None else year,
            attempts=1,
        )
