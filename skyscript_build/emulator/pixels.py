"""Pixels: read registered rasters into a requested grid, and encode the answer.

A grid is a CRS, an affine transform and a size, as in ``computePixels``. Reading uses a direct
window read when the grid is the raster's own (same CRS, same pixel size, whole-pixel offset)
and ``rasterio.warp.reproject`` (nearest neighbour, Earth Engine's default) otherwise. Pixels
outside the raster are masked.
"""

from __future__ import annotations

import io
import math
import threading
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from PIL import Image as PILImage
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window

from .collections import ImageRecord
from .values import EvalError

__all__ = ["Grid", "read_record", "encode", "MAX_REQUEST_BYTES", "JPEG_QUALITY"]

# Earth Engine refuses computePixels answers above 48 MiB and 32768 px on a side.
MAX_REQUEST_BYTES = 50331648
MAX_SIDE = 32768
JPEG_QUALITY = 85


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a request."""

    crs: str
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        xs, ys = [], []
        for col, row in ((0, 0), (self.width, 0), (0, self.height), (self.width, self.height)):
            x, y = self.transform * (col, row)
            xs.append(x)
            ys.append(y)
        return min(xs), min(ys), max(xs), max(ys)


_crs_cache: dict[str, CRS] = {}
_crs_lock = threading.Lock()


def crs_of(text: str) -> CRS:
    """A cached ``rasterio.crs.CRS`` from its text."""
    with _crs_lock:
        crs = _crs_cache.get(text)
        if crs is None:
            crs = _crs_cache[text] = CRS.from_user_input(text)
        return crs


class _DatasetPool:
    """Open rasterio datasets, one per thread at a time (datasets are not thread-safe)."""

    def __init__(self) -> None:
        self._free: dict[str, list] = defaultdict(list)
        self._lock = threading.Lock()

    def borrow(self, path: str):  # noqa: ANN201 - a rasterio DatasetReader
        with self._lock:
            if self._free[path]:
                return self._free[path].pop()
        return rasterio.open(path)

    def give_back(self, path: str, ds) -> None:  # noqa: ANN001
        with self._lock:
            if len(self._free[path]) < 64:
                self._free[path].append(ds)
                return
        ds.close()


_pool = _DatasetPool()


def _aligned_offset(record: ImageRecord, grid: Grid) -> tuple[int, int] | None:
    """(col, row) offset of the grid in the raster when it is the raster's own grid."""
    if grid.crs != record.crs and crs_of(grid.crs) != crs_of(record.crs):
        return None
    a, b, c, d, e, f = record.transform
    g = grid.transform
    if g.b != 0 or g.d != 0 or b != 0 or d != 0:
        return None
    if not (math.isclose(g.a, a, rel_tol=1e-9) and math.isclose(g.e, e, rel_tol=1e-9)):
        return None
    col = (g.c - c) / a
    row = (g.f - f) / e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return int(round(col)), int(round(row))


def read_record(record: ImageRecord, grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``bands`` (0-based) of ``record`` in ``grid``: data (n, h, w) and mask (h, w)."""
    n, h, w = len(bands), grid.height, grid.width
    data = np.zeros((n, h, w), dtype=record.dtype)
    mask = np.zeros((h, w), dtype=bool)
    offset = _aligned_offset(record, grid)
    indexes = [b + 1 for b in bands]
    if offset is not None:
        col, row = offset
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + w, record.width), min(row + h, record.height)
        if c1 <= c0 or r1 <= r0:
            return data, mask
        ds = _pool.borrow(str(record.path))
        try:
            window = Window(c0, r0, c1 - c0, r1 - r0)
            block = ds.read(indexes, window=window)
            nodata = ds.nodata
        finally:
            _pool.give_back(str(record.path), ds)
        ys, xs = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        data[:, ys, xs] = block
        mask[ys, xs] = True if nodata is None else np.any(block != nodata, axis=0)
        return data, mask
    # General case: read the source window covering the grid, then warp it.
    src_crs, dst_crs = crs_of(record.crs), crs_of(grid.crs)
    try:
        left, bottom, right, top = transform_bounds(dst_crs, src_crs, *grid.bounds, densify_pts=8)
    except Exception:  # noqa: BLE001 - a grid that does not project here covers nothing
        return data, mask
    inv = ~Affine(*record.transform)
    cols, rows = zip(
        *(inv * (x, y) for x, y in ((left, top), (right, top), (left, bottom), (right, bottom))),
        strict=True,
    )
    c0 = max(int(math.floor(min(cols))) - 2, 0)
    r0 = max(int(math.floor(min(rows))) - 2, 0)
    c1 = min(int(math.ceil(max(cols))) + 2, record.width)
    r1 = min(int(math.ceil(max(rows))) + 2, record.height)
    if c1 <= c0 or r1 <= r0:
        return data, mask
    ds = _pool.borrow(str(record.path))
    try:
        window = Window(c0, r0, c1 - c0, r1 - r0)
        block = ds.read(indexes, window=window)
        src_transform = ds.window_transform(window)
        nodata = ds.nodata
    finally:
        _pool.give_back(str(record.path), ds)
    valid = (
        np.full(block.shape[1:], 255, np.uint8)
        if nodata is None
        else np.any(block != nodata, axis=0).astype(np.uint8) * 255
    )
    if block.dtype == np.uint8:
        src = np.concatenate([block, valid[None]], axis=0)
        dst = np.zeros((n + 1, h, w), dtype=np.uint8)
        reproject(
            src,
            dst,
            src_transform=src_transform,
            src_crs=src_crs,
            dst_transform=grid.transform,
            dst_crs=dst_crs,
            resampling=Resampling.nearest,
            src_nodata=None,
            dst_nodata=None,
        )
        return dst[:n], dst[n] > 0
    for arr, out in ((block, data), (valid[None], mask_buf := np.zeros((1, h, w), np.uint8))):
        reproject(
            arr,
            out,
            src_transform=src_transform,
            src_crs=src_crs,
            dst_transform=grid.transform,
            dst_crs=dst_crs,
            resampling=Resampling.nearest,
            src_nodata=None,
            dst_nodata=None,
        )
    return data, mask_buf[0] > 0


def encode(
    data: np.ndarray, mask: np.ndarray, band_names: list[str], file_format: str, grid: Grid
) -> tuple[bytes, str]:
    """Encode (n, h, w) pixels and their (n, h, w) mask as ``file_format``: bytes, MIME type.

    Masked pixels are 0 (JPEG, NPY, GEO_TIFF) or transparent (PNG). JPEG and PNG need 1 or 3
    bands of 8-bit values (visualise first), as Earth Engine requires.
    """
    fmt = file_format.upper()
    if fmt in ("JPEG", "PNG", "AUTO_JPEG_PNG"):
        if data.shape[0] not in (1, 3) or data.dtype != np.uint8:
            raise EvalError(
                f"Image.visualize is needed for {fmt}: expected 1 or 3 bands of type uint8, "
                f"got {data.shape[0]} band(s) of type {data.dtype}."
            )
        any_masked = not mask.all()
        pixels = np.where(mask, data, 0) if any_masked else data
        arr = np.ascontiguousarray(pixels.transpose(1, 2, 0))
        if data.shape[0] == 1:
            arr = arr[:, :, 0]
        buf = io.BytesIO()
        if fmt == "JPEG" or (fmt == "AUTO_JPEG_PNG" and not any_masked):
            PILImage.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
            return buf.getvalue(), "image/jpeg"
        alpha = (mask.all(axis=0) * 255).astype(np.uint8)
        if arr.ndim == 2:
            rgba = np.dstack([arr, alpha])
            PILImage.fromarray(rgba, mode="LA").save(buf, format="PNG")
        else:
            PILImage.fromarray(np.dstack([arr, alpha]), mode="RGBA").save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    if fmt == "NPY":
        structured = np.zeros(
            (grid.height, grid.width), dtype=[(name, data.dtype) for name in band_names]
        )
        for i, name in enumerate(band_names):
            structured[name] = np.where(mask[i], data[i], 0)
        buf = io.BytesIO()
        np.save(buf, structured, allow_pickle=False)
        return buf.getvalue(), "application/octet-stream"
    if fmt in ("GEO_TIFF", "GEOTIFF"):
        from rasterio.io import MemoryFile

        with MemoryFile() as mem:
            with mem.open(
                driver="GTiff",
                width=grid.width,
                height=grid.height,
                count=data.shape[0],
                dtype=data.dtype,
                crs=grid.crs,
                transform=grid.transform,
            ) as ds:
                ds.write(np.where(mask, data, 0).astype(data.dtype))
                ds.descriptions = tuple(band_names)
            return mem.read(), "image/tiff"
    raise EvalError(f"Invalid value at 'file_format': {file_format!r} is not supported.")
