"""Pixels: read registered rasters into a requested grid, and encode the answer.

A grid is a CRS, an affine transform and a size, as in ``computePixels``. Reading uses a direct
window read when the grid is the raster's own (same CRS, same pixel size, whole-pixel offset)
and ``rasterio.warp.reproject`` (nearest neighbour, Earth Engine's default) otherwise. Pixels
outside the raster are masked.
"""

from __future__ import annotations

import io
import os
import threading
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import rasterio
from affine import Affine
from PIL import Image as PILImage
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from .._once import once_per_process
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


@once_per_process
def crs_of(text: str) -> CRS:
    """A cached ``rasterio.crs.CRS`` from its text."""
    return CRS.from_user_input(text)


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


class _RasterCache:
    """Whole rasters decoded in memory, pixel-interleaved (rows, cols, bands), up to a budget.

    The emulator reads many small windows of a few rasters: decoding each once makes a window
    read a numpy slice. Rasters that do not fit the budget are read window by window.
    The budget is ``SKYSCRIPT_EMULATOR_CACHE_MB`` (default 1024).
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray | None] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._used = 0

    def get(self, record: ImageRecord) -> np.ndarray | None:
        key = str(record.path)
        if key in self._arrays:
            return self._arrays[key]
        budget = int(os.environ.get("SKYSCRIPT_EMULATOR_CACHE_MB", "1024")) * 2**20
        size = record.width * record.height * len(record.bands) * np.dtype(record.dtype).itemsize
        with self._lock:
            loading = self._loading[key]
        with loading:
            if key in self._arrays:
                return self._arrays[key]
            with self._lock:
                fits = self._used + size <= budget
                if fits:
                    self._used += size
            array = None
            if fits:
                ds = _pool.borrow(key)
                try:
                    array = np.ascontiguousarray(ds.read().transpose(1, 2, 0))
                finally:
                    _pool.give_back(key, ds)
            self._arrays[key] = array
            return array


_cache = _RasterCache()


@lru_cache(maxsize=256)
def _same_crs(a: str, b: str) -> bool:
    return a == b or crs_of(a) == crs_of(b)


@lru_cache(maxsize=256)
def _transformer(src: str, dst: str) -> Transformer:
    return Transformer.from_crs(crs_of(src), crs_of(dst), always_xy=True)


def _interp_index(n: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For positions 0.5 .. n-0.5: the node below each (k) and the weight of the next (t)."""
    pos = np.arange(n) + 0.5
    k = np.clip(np.searchsorted(nodes, pos, side="right") - 1, 0, len(nodes) - 2)
    return k, (pos - nodes[k]) / (nodes[k + 1] - nodes[k])


def _interp(values: np.ndarray, ki: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Linear interpolation of ``values`` along its last axis (no BLAS: cheap and exact)."""
    k, t = ki
    return values[..., k] * (1 - t) + values[..., k + 1] * t


def _pixel_map(record: ImageRecord, grid: Grid) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Source pixel coordinates (rows, cols) of the grid's pixel centres.

    Returns 1-D rows (h) and cols (w) when the mapping is separable (no rotation), else 2-D
    (h, w) arrays; None when the grid does not project onto the raster. Between different
    CRSs the exact transform is computed every 32 pixels and interpolated linearly in between
    (as GDAL's approximate transformer does; the error is far below a pixel).
    """
    h, w = grid.height, grid.width
    inv_src = ~Affine(*record.transform)
    same = _same_crs(grid.crs, record.crs)
    if same:
        m = inv_src * grid.transform
        if m.b == 0 and m.d == 0:
            cols = m.a * (np.arange(w) + 0.5) + m.c
            rows = m.e * (np.arange(h) + 0.5) + m.f
            return rows, cols, True
        jj, ii = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        return m.d * ii + m.e * jj + m.f, m.a * ii + m.b * jj + m.c, False
    step = 32
    col_nodes = np.unique(np.append(np.arange(0, w, step) + 0.5, w - 0.5))
    row_nodes = np.unique(np.append(np.arange(0, h, step) + 0.5, h - 0.5))
    jj, ii = np.meshgrid(row_nodes, col_nodes, indexing="ij")
    g = grid.transform
    x, y = g.a * ii + g.b * jj + g.c, g.d * ii + g.e * jj + g.f
    try:
        sx, sy = _transformer(grid.crs, record.crs).transform(x, y)
    except Exception:  # noqa: BLE001 - pyproj raises for points it cannot project
        return None
    sx, sy = np.asarray(sx, dtype=np.float64), np.asarray(sy, dtype=np.float64)
    if not (np.isfinite(sx).all() and np.isfinite(sy).all()):
        return None
    a = inv_src
    cols_c = a.a * sx + a.b * sy + a.c
    rows_c = a.d * sx + a.e * sy + a.f
    if len(col_nodes) == 1 or len(row_nodes) == 1:
        col_nodes = np.append(col_nodes, col_nodes[-1] + 1) if len(col_nodes) == 1 else col_nodes
        row_nodes = np.append(row_nodes, row_nodes[-1] + 1) if len(row_nodes) == 1 else row_nodes
        cols_c = cols_c if cols_c.shape[1] > 1 else np.repeat(cols_c, 2, axis=1)
        cols_c = cols_c if cols_c.shape[0] > 1 else np.repeat(cols_c, 2, axis=0)
        rows_c = rows_c if rows_c.shape[1] > 1 else np.repeat(rows_c, 2, axis=1)
        rows_c = rows_c if rows_c.shape[0] > 1 else np.repeat(rows_c, 2, axis=0)
    ri, ci = _interp_index(h, row_nodes), _interp_index(w, col_nodes)
    if np.abs(cols_c - cols_c[:1]).max() < 1e-6 and np.abs(rows_c - rows_c[:, :1]).max() < 1e-6:
        return _interp(rows_c[:, 0], ri), _interp(cols_c[0], ci), True
    # 2-D: along columns first (nr x w), then along rows (h x w).
    rows = _interp(_interp(rows_c, ci).T, ri).T
    cols = _interp(_interp(cols_c, ci).T, ri).T
    return rows, cols, False


def read_record(record: ImageRecord, grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``bands`` (0-based) of ``record`` in ``grid``: data (n, h, w) and mask (h, w).

    Nearest-neighbour sampling at pixel centres, as Earth Engine (and GDAL) do by default;
    pixels outside the raster (or equal to its nodata value) are masked.
    """
    h, w = grid.height, grid.width
    empty = (
        np.zeros((len(bands), h, w), dtype=record.dtype),
        np.zeros((h, w), dtype=bool),
    )
    mapping = _pixel_map(record, grid)
    if mapping is None:
        return empty
    rows_f, cols_f, separable = mapping
    r_idx = np.floor(rows_f + 1e-9).astype(np.int64)
    c_idx = np.floor(cols_f + 1e-9).astype(np.int64)
    valid_r = (r_idx >= 0) & (r_idx < record.height)
    valid_c = (c_idx >= 0) & (c_idx < record.width)
    valid = valid_r[:, None] & valid_c[None, :] if separable else valid_r & valid_c
    if not valid.any():
        return empty
    r0, r1 = int(r_idx[valid_r].min()), int(r_idx[valid_r].max()) + 1
    c0, c1 = int(c_idx[valid_c].min()), int(c_idx[valid_c].max()) + 1
    cached = _cache.get(record)
    if cached is not None:
        src = cached[r0:r1, c0:c1]
    else:
        ds = _pool.borrow(str(record.path))
        try:
            src = ds.read(window=Window(c0, r0, c1 - c0, r1 - r0)).transpose(1, 2, 0)
        finally:
            _pool.give_back(str(record.path), ds)
    rr = np.clip(r_idx - r0, 0, r1 - r0 - 1)
    cc = np.clip(c_idx - c0, 0, c1 - c0 - 1)
    if separable:
        if _is_run(rr) and _is_run(cc):
            data = src[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1]
        else:
            data = src[rr][:, cc]
    else:
        data = src[rr, cc]
    if bands != list(range(len(record.bands))):
        data = data[..., bands]
    nodata = record.nodata
    if nodata is not None:
        valid = valid & np.any(data != nodata, axis=-1)
    return data.transpose(2, 0, 1), valid


def _is_run(idx: np.ndarray) -> bool:
    """True when idx is a run of consecutive integers (a plain slice)."""
    return (
        len(idx) > 0
        and int(idx[-1]) - int(idx[0]) == len(idx) - 1
        and bool((np.diff(idx) == 1).all())
    )


def encode(
    data: np.ndarray, mask: np.ndarray, band_names: list[str], file_format: str, grid: Grid
) -> tuple[bytes, str]:
    """Encode (n, h, w) pixels and their mask ((h, w) or (n, h, w)) as ``file_format``.

    Returns the bytes and their MIME type. Masked pixels are 0 (JPEG, NPY, GEO_TIFF) or
    transparent (PNG). JPEG and PNG need 1 or 3 bands of 8-bit values (visualise first), as
    Earth Engine requires.
    """
    fmt = file_format.upper()
    if fmt in ("JPEG", "PNG", "AUTO_JPEG_PNG"):
        if data.shape[0] not in (1, 3) or data.dtype != np.uint8:
            raise EvalError(
                f"Image.visualize is needed for {fmt}: expected 1 or 3 bands of type uint8, "
                f"got {data.shape[0]} band(s) of type {data.dtype}."
            )
        any_masked = not mask.all()
        pixels = np.where(mask, data, 0).astype(np.uint8) if any_masked else data
        arr = np.ascontiguousarray(pixels.transpose(1, 2, 0))
        if data.shape[0] == 1:
            arr = arr[:, :, 0]
        buf = io.BytesIO()
        if fmt == "JPEG" or (fmt == "AUTO_JPEG_PNG" and not any_masked):
            PILImage.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
            return buf.getvalue(), "image/jpeg"
        alpha = ((mask if mask.ndim == 2 else mask.all(axis=0)) * 255).astype(np.uint8)
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
            structured[name] = np.where(mask if mask.ndim == 2 else mask[i], data[i], 0)
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
                ds.write(np.where(mask, data, 0).astype(data.dtype))  # mask broadcasts
                ds.descriptions = tuple(band_names)
            return mem.read(), "image/tiff"
    raise EvalError(f"Invalid value at 'file_format': {file_format!r} is not supported.")
