"""Source choice, tag-balanced sampling and tile framing, vectorised over all objects."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from image_sources import ImageSource

from ._geo import (
    STREAM_LIMIT,
    STREAM_SAMPLE,
    STREAM_SHIFT_X,
    STREAM_SHIFT_Y,
    ProjectedBounds,
    lonlat_box,
    thread_chunks,
    tile_pixels,
    uniform,
    utm_epsg,
)
from ._objects import Objects

#: Skip reasons, in the order they are checked.
OUTSIDE = "outside-coverage"
TOO_COARSE = "no-source-fine-enough"
TOO_LARGE = "too-large"
SAMPLED_OUT = "sampled-out"
OVER_LIMIT = "over-max-requests"
DUPLICATE = "duplicate-key"


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts.astype(np.int64) - (ends - lengths), lengths) + np.arange(total)


def source_epsg(source: ImageSource) -> int | None:
    """The EPSG code of a source's own CRS, or None (local UTM zone)."""
    if source.crs is None:
        return None
    text = source.crs.upper()
    if not text.startswith("EPSG:"):
        from ..errors import ConfigError

        raise ConfigError(f"image source '{source.alias}': crs must be 'EPSG:<code>'")
    return int(text.split(":", 1)[1])


@dataclass
class Choice:
    """The chosen source per object (-1: none) and how many objects were skipped, by reason."""

    source: np.ndarray
    epsg: np.ndarray
    pixels: np.ndarray
    skipped: dict[str, int]


def choose_sources(
    objs: Objects,
    sources: Sequence[ImageSource],
    proj: ProjectedBounds,
    px: tuple[int, int, float],
    max_px: int,
) -> Choice:
    """For each object, the finest source that covers it, is fine enough and fits in max_px.

    ``sources`` must be sorted finest first; ``px`` = (min_px, point_px, margin).
    """
    n = len(objs)
    chosen = np.full(n, -1, dtype=np.int64)
    epsg = np.zeros(n, dtype=np.int64)
    pixels = np.zeros(n, dtype=np.int64)
    covered_any = np.zeros(n, dtype=bool)
    fine_any = np.zeros(n, dtype=bool)
    b = objs.bounds
    centre_x, centre_y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    utm = utm_epsg(centre_x, centre_y)
    fixed = objs.kind != 3  # points and lines: fixed pixel size unless longer
    for k, source in enumerate(sources):
        todo = np.flatnonzero(chosen < 0)
        if len(todo) == 0:
            break
        todo = todo[_covered(source, objs, todo, proj.threads)]
        covered_any[todo] = True
        todo = todo[source.gsd <= objs.max_gsd[todo] * (1 + 1e-9)]
        fine_any[todo] = True
        if len(todo) == 0:
            continue
        own = source_epsg(source)
        codes = utm[todo] if own is None else np.full(len(todo), own, dtype=np.int64)
        pb = proj.get(codes, todo)
        extent = np.maximum(pb[:, 2] - pb[:, 0], pb[:, 3] - pb[:, 1])
        side_px = tile_pixels(extent, fixed[todo], source.gsd, px)
        fits = side_px <= max_px
        sel = todo[fits]
        chosen[sel] = k
        epsg[sel] = codes[fits]
        pixels[sel] = side_px[fits]
    none = chosen < 0
    skipped = {
        OUTSIDE: int((none & ~covered_any).sum()),
        TOO_COARSE: int((none & covered_any & ~fine_any).sum()),
        TOO_LARGE: int((none & fine_any).sum()),
    }
    return Choice(source=chosen, epsg=epsg, pixels=pixels, skipped=skipped)


#: Cells per side of the grid that classifies a coverage polygon (see ``_inside_cells``).
COVERAGE_GRID = 128


def _covered(source: ImageSource, objs: Objects, idx: np.ndarray, threads: int = 1) -> np.ndarray:
    """Mask over ``idx``: the object lies entirely inside the source's coverage.

    An object whose bounds lie in grid cells wholly inside the coverage is covered (no GEOS
    call: most objects, far from a border); the others are tested against the polygon.
    """
    if source.is_global:
        return np.ones(len(idx), dtype=bool)
    w, s, e, n = source.coverage.bounds
    b = objs.bounds[idx]
    inside_env = (b[:, 0] >= w) & (b[:, 1] >= s) & (b[:, 2] <= e) & (b[:, 3] <= n)
    out = np.zeros(len(idx), dtype=bool)
    cand = np.flatnonzero(inside_env)
    if len(cand) == 0:
        return out
    wkb = shapely.to_wkb(source.coverage)
    sums, cell_w, cell_h = _inside_cells(wkb)
    bc = b[cand]
    last = COVERAGE_GRID - 1
    i0 = np.clip(((bc[:, 0] - w) / cell_w).astype(np.int64), 0, last)
    i1 = np.clip(((bc[:, 2] - w) / cell_w).astype(np.int64), 0, last) + 1
    j0 = np.clip(((bc[:, 1] - s) / cell_h).astype(np.int64), 0, last)
    j1 = np.clip(((bc[:, 3] - s) / cell_h).astype(np.int64), 0, last) + 1
    # Sure when every cell the object's bounds touch is wholly inside (2-D prefix sums).
    inside = sums[j1, i1] - sums[j0, i1] - sums[j1, i0] + sums[j0, i0]
    sure = inside == (i1 - i0) * (j1 - j0)
    out[cand[sure]] = True
    cand = cand[~sure]
    if len(cand):
        geoms = objs.geometry[idx[cand]]

        def contains(part: slice) -> np.ndarray:
            # A prepared GEOS geometry must not be shared by threads: each chunk its own copy.
            own = shapely.from_wkb(wkb)
            shapely.prepare(own)
            return shapely.contains(own, geoms[part])

        out[cand] = thread_chunks(contains, len(geoms), threads)
    return out


@functools.lru_cache(maxsize=64)
def _inside_cells(wkb: bytes) -> tuple[np.ndarray, float, float]:
    """A COVERAGE_GRID x COVERAGE_GRID grid over the coverage's bounds: the 2-D prefix sums
    (rows, then columns; one leading zero row and column) of the cells wholly inside it, and
    the cell's width and height in degrees."""
    coverage = shapely.from_wkb(wkb)
    shapely.prepare(coverage)
    w, s, e, n = coverage.bounds
    cell_w, cell_h = (e - w) / COVERAGE_GRID, (n - s) / COVERAGE_GRID
    x = w + cell_w * np.arange(COVERAGE_GRID)
    y = s + cell_h * np.arange(COVERAGE_GRID)
    gx, gy = np.meshgrid(x, y)
    # Cells grown by a hair, so that rounding in the lookup never trusts a border cell.
    pad_x, pad_y = cell_w * 1e-6, cell_h * 1e-6
    cells = shapely.box(gx - pad_x, gy - pad_y, gx + cell_w + pad_x, gy + cell_h + pad_y)
    full = shapely.contains(coverage, cells).astype(np.int64)
    sums = np.zeros((COVERAGE_GRID + 1, COVERAGE_GRID + 1), dtype=np.int64)
    sums[1:, 1:] = full.cumsum(axis=0).cumsum(axis=1)
    return sums, cell_w, cell_h


def sample_by_tag(objs: Objects, idx: np.ndarray, h: np.ndarray, cap: int) -> np.ndarray:
    """Mask over ``idx``: per-tag quotas, every tag keeps up to ``cap`` objects.

    Objects are ranked per ``key=value`` tag in a seeded random order; an object is kept when
    it ranks below ``cap`` for at least one of its tags. A tag with at most ``cap`` objects
    (rare) keeps them all; a common tag keeps ``cap`` plus those kept for a rarer co-tag.
    """
    starts = objs.tag_offsets[idx]
    lengths = objs.tag_offsets[idx + 1] - starts
    entries = ranges(starts, lengths)
    owner = np.repeat(np.arange(len(idx)), lengths)
    tag = objs.tag_code[entries]
    r = uniform(h[idx], STREAM_SAMPLE)[owner]
    order = np.lexsort((owner, r, tag))
    tag_sorted = tag[order]
    first = np.flatnonzero(np.r_[True, tag_sorted[1:] != tag_sorted[:-1]])
    group_start = np.repeat(first, np.diff(np.r_[first, len(order)]))
    rank = np.arange(len(order)) - group_start
    kept_entries = order[rank < cap]
    return np.bincount(owner[kept_entries], minlength=len(idx)) > 0


def limit(idx: np.ndarray, h: np.ndarray, max_requests: int) -> np.ndarray:
    """Mask over ``idx``: a seeded random ``max_requests`` of them."""
    if len(idx) <= max_requests:
        return np.ones(len(idx), dtype=bool)
    r = uniform(h[idx], STREAM_LIMIT)
    keep = np.zeros(len(idx), dtype=bool)
    keep[np.argsort(r, kind="stable")[:max_requests]] = True
    return keep


@dataclass
class Frames:
    """The square tile of every request."""

    xy: np.ndarray  # (M, 4) x_min, y_min, x_max, y_max in the tile's CRS
    lonlat: np.ndarray  # (M, 4) west, south, east, north
    pixels: np.ndarray  # (M,) side in pixels


def frame(
    objs: Objects,
    idx: np.ndarray,
    epsg: np.ndarray,
    gsd: np.ndarray,
    pixels: np.ndarray,
    proj: ProjectedBounds,
    h: np.ndarray,
    shift: float,
) -> Frames:
    """Square boxes of ``pixels * gsd`` metres holding each object, shifted off-centre.

    The random shift (seeded per object) moves the box over a fraction ``shift`` of the slack
    around the object, so the object always stays inside.
    """
    pb = proj.get(epsg, idx)
    side = pixels * gsd
    out = np.empty_like(pb)
    for axis, stream in ((0, STREAM_SHIFT_X), (1, STREAM_SHIFT_Y)):
        lo, hi = pb[:, axis], pb[:, axis + 2]
        slack = np.maximum(side - (hi - lo), 0.0)
        u = uniform(h[idx], stream)
        start = lo - slack * (0.5 + shift * (u - 0.5))
        start = np.minimum(np.maximum(start, hi - side), lo)
        out[:, axis], out[:, axis + 2] = start, start + side
    return Frames(xy=out, lonlat=lonlat_box(epsg, out, proj.threads), pixels=pixels)
