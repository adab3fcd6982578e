"""Geometry helpers of the plan stage: seeded per-object hashes, projections, tile framing."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pyproj import Transformer

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Streams: independent random numbers drawn from the same object hash.
STREAM_SHIFT_X = 1
STREAM_SHIFT_Y = 2
STREAM_SAMPLE = 3
STREAM_SURROUND = 4
STREAM_LIMIT = 5


def mix64(x: Any) -> Any:
    """SplitMix64's finaliser on a uint64 array: a fast, well-spread, stable hash."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def object_hash(seed: int, kind: np.ndarray, element: np.ndarray, osm_id: np.ndarray) -> np.ndarray:
    """A uint64 per object from (seed, osm_type, osm_element, osm_id); never Python's hash()."""
    with np.errstate(over="ignore"):
        code = (kind.astype(np.uint64) << np.uint64(4)) | element.astype(np.uint64)
        ids = osm_id.astype(np.int64).view(np.uint64)
        base = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(1))
        return mix64(mix64(ids ^ base) ^ (code * _GOLDEN))


def uniform(h: np.ndarray, stream: int) -> np.ndarray:
    """A float in [0, 1) per hash, independent across ``stream`` values."""
    with np.errstate(over="ignore"):
        x = mix64(h ^ (np.uint64(stream) * _GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts.astype(np.int64) - (ends - lengths), lengths) + np.arange(total)


def utm_epsg(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The EPSG code of the WGS 84 / UTM zone of each point (326xx north, 327xx south)."""
    zone = np.clip(np.floor((lon + 180.0) / 6.0).astype(np.int64) + 1, 1, 60)
    return np.where(lat >= 0, 32600, 32700) + zone


def distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted: ``np.unique`` by one sort (numpy 2.4's hash-based
    ``np.unique`` took 30x longer on our index arrays)."""
    values = np.sort(values, axis=None)
    if len(values) < 2:
        return values
    return values[np.r_[True, values[1:] != values[:-1]]]


#: Rows per chunk of the threaded geometry functions (shapely and pyproj release the GIL).
THREAD_CHUNK = 32_768


def thread_chunks(fn: Callable[[slice], np.ndarray], n: int, threads: int) -> np.ndarray:
    """``fn`` over consecutive slices of ``range(n)`` on ``threads`` threads, concatenated."""
    if threads <= 1 or n <= THREAD_CHUNK:
        return fn(slice(0, n))
    slices = [slice(k, min(n, k + THREAD_CHUNK)) for k in range(0, n, THREAD_CHUNK)]
    return np.concatenate(list(_pool(threads).map(fn, slices)))


@functools.lru_cache(maxsize=8)
def _pool(threads: int) -> ThreadPoolExecutor:
    """A lasting pool per thread count: its threads keep their pyproj transformers (making
    one costs up to 50 ms). Its tasks must not wait on the same pool."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"plan-geo-{threads}")


def transformer(epsg: int, inverse: bool = False) -> Transformer:
    """lon/lat -> EPSG:epsg (or back with ``inverse``), x/y order; one per thread (a pyproj
    Transformer must not be shared between threads)."""
    return _transformer(epsg, inverse, threading.get_ident())


@functools.lru_cache(maxsize=256)
def _transformer(epsg: int, inverse: bool, thread: int) -> Transformer:
    if inverse:
        return Transformer.from_crs(epsg, 4326, always_xy=True)
    return Transformer.from_crs(4326, epsg, always_xy=True)


#: Where a lon/lat box is sampled when projected: its corners and the middles of its edges
#: (fractions of its width and height). A parallel bows in a projected grid; with the middles
#: the error on a 30 km box at 60 degrees is about 7 m, on a 1 km box well under a millimetre.
_BOX_FX = np.array([0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0])
_BOX_FY = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.5])


def project_bounds(lonlat: np.ndarray, epsg: int, threads: int = 1) -> np.ndarray:
    """Bounds (N, 4) in EPSG:epsg of lon/lat boxes ``lonlat`` (N, 4: west, south, east,
    north): the box's corners and edge middles projected (a point: itself)."""
    if threads > 1:
        return thread_chunks(lambda s: project_bounds(lonlat[s], epsg), len(lonlat), threads)
    out = np.empty((len(lonlat), 4), dtype=np.float64)
    if len(lonlat) == 0:
        return out
    to = transformer(epsg)
    point = (lonlat[:, 0] == lonlat[:, 2]) & (lonlat[:, 1] == lonlat[:, 3])
    if point.any():  # most objects: one point to project, not eight
        x, y = to.transform(lonlat[point, 0], lonlat[point, 1])
        out[point, 0] = out[point, 2] = x
        out[point, 1] = out[point, 3] = y
    box = ~point
    if box.any():
        w, s, e, n = (lonlat[box][:, [k]] for k in range(4))
        x, y = to.transform((w + (e - w) * _BOX_FX).ravel(), (s + (n - s) * _BOX_FY).ravel())
        x = np.asarray(x, dtype=np.float64).reshape(-1, len(_BOX_FX))
        y = np.asarray(y, dtype=np.float64).reshape(-1, len(_BOX_FX))
        out[box, 0], out[box, 1] = x.min(axis=1), y.min(axis=1)
        out[box, 2], out[box, 3] = x.max(axis=1), y.max(axis=1)
    return out


class ProjectedBounds:
    """Per-CRS projected bounds of the objects' lon/lat boxes, computed on demand and kept.

    The plan frames tiles and finds surroundings from the objects' boxes alone (the extract's
    ``bbox`` column), never their geometries: an object lies inside a tile when its projected
    box does.
    """

    def __init__(
        self, lonlat: np.ndarray, threads: int = 1, known: dict[int, np.ndarray] | None = None
    ) -> None:
        """``known``: bounds already projected, per EPSG code (every object's)."""
        self.lonlat = lonlat
        self.threads = threads
        self._bounds: dict[int, np.ndarray] = dict(known or {})
        self._done = {k: np.ones(len(lonlat), dtype=bool) for k in self._bounds}

    def get(self, epsg: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Bounds (len(index), 4) of objects ``index``, each in its ``epsg`` (same length)."""
        out = np.empty((len(index), 4), dtype=np.float64)
        if len(index) == 0:
            return out
        for code in distinct(epsg):
            sel = np.flatnonzero(epsg == code)
            out[sel] = self._get_one(int(code), index[sel])
        return out

    def _get_one(self, code: int, index: np.ndarray) -> np.ndarray:
        if code not in self._bounds:
            self._bounds[code] = np.full((len(self.lonlat), 4), np.nan)
            self._done[code] = np.zeros(len(self.lonlat), dtype=bool)
        bounds, done = self._bounds[code], self._done[code]
        need = np.zeros(len(done), dtype=bool)
        need[index[~done[index]]] = True
        todo = np.flatnonzero(need)  # unique and sorted, without sorting
        if len(todo):
            bounds[todo] = project_bounds(self.lonlat[todo], code, self.threads)
            done[todo] = True
        return bounds[index]


def tile_pixels(
    extent_m: np.ndarray, fixed: np.ndarray, gsd: float | np.ndarray, cfg_px: tuple
) -> np.ndarray:
    """The side in pixels of each object's tile at ``gsd`` (may exceed ``max_px``).

    The extent plus the margin on both sides, at least ``min_px`` for areas and at least
    ``point_px`` where ``fixed`` (points and lines). ``cfg_px`` = (min_px, point_px, margin).
    """
    min_px, point_px, margin = cfg_px
    need = np.ceil(extent_m * (1.0 + 2.0 * margin) / gsd - 1e-9)
    floor = np.where(fixed, point_px, min_px).astype(np.float64)
    return np.maximum(need, floor)


def lonlat_box(epsg: np.ndarray, xy: np.ndarray, threads: int = 1) -> np.ndarray:
    """lon/lat bounds (N, 4) of projected boxes ``xy`` (N, 4), each in its ``epsg``.

    The four corners are projected back (edges of a tile are straight to well under a
    millimetre at these sizes).
    """
    if threads > 1:
        return thread_chunks(lambda s: lonlat_box(epsg[s], xy[s]), len(xy), threads)
    out = np.empty_like(xy)
    fx = np.array([0.0, 1.0, 1.0, 0.0])
    fy = np.array([0.0, 0.0, 1.0, 1.0])
    for code in distinct(epsg):
        sel = np.flatnonzero(epsg == code)
        b = xy[sel]
        px = b[:, [0]] + (b[:, [2]] - b[:, [0]]) * fx
        py = b[:, [1]] + (b[:, [3]] - b[:, [1]]) * fy
        lon, lat = transformer(int(code), inverse=True).transform(px.ravel(), py.ravel())
        lon = np.asarray(lon).reshape(px.shape)
        lat = np.asarray(lat).reshape(py.shape)
        out[sel, 0], out[sel, 1] = lon.min(axis=1), lat.min(axis=1)
        out[sel, 2], out[sel, 3] = lon.max(axis=1), lat.max(axis=1)
    return out
