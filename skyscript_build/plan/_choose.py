"""Source choice, tag-balanced sampling and tile framing, vectorised over many objects.

Every decision here is one object's own, given its tags, box and hash and a few global
numbers (the per-tag counts, the request cut): any partition of the objects decides alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from image_sources import ImageSource

from ._geo import (
    STREAM_LIMIT,
    STREAM_SAMPLE,
    STREAM_SHIFT_X,
    STREAM_SHIFT_Y,
    ProjectedBounds,
    lonlat_box,
    ranges,
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
    """Mask over ``idx``: the object's box lies entirely inside the source's coverage.

    A box in grid cells wholly inside the coverage is covered (no GEOS call: most objects, far
    from a border); the others are tested against the polygon.
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
        boxes = box_geometries(b[cand])

        def contains(part: slice) -> np.ndarray:
            # A prepared GEOS geometry must not be shared by threads: each chunk its own copy.
            own = shapely.from_wkb(wkb)
            shapely.prepare(own)
            return shapely.contains(own, boxes[part])

        out[cand] = thread_chunks(contains, len(boxes), threads)
    return out


def box_geometries(b: np.ndarray) -> np.ndarray:
    """Shapely geometries of lon/lat boxes (N, 4): a point or a segment where the box is flat
    (a degenerate polygon would not be valid)."""
    flat_x, flat_y = b[:, 0] == b[:, 2], b[:, 1] == b[:, 3]
    out = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    point = flat_x & flat_y
    out[point] = shapely.points(b[point, 0], b[point, 1])
    line = flat_x ^ flat_y
    if line.any():
        coords = np.stack([b[line][:, [0, 1]], b[line][:, [2, 3]]], axis=1)
        out[line] = shapely.linestrings(coords)
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


def sampling_threshold(
    objs: Objects, idx: np.ndarray, counts: dict[str, int], cap: int
) -> np.ndarray:
    """Per object of ``idx``: the largest ``cap / count`` over its ``key=value`` tags, where
    ``counts`` holds the global count of every tag seen on more than ``cap`` candidates (a
    tag it lacks is rare: threshold 1 or more, the object is kept)."""
    starts = objs.tag_offsets[idx]
    lengths = objs.tag_offsets[idx + 1] - starts
    entries = ranges(starts, lengths)
    if not counts or len(entries) == 0:
        return np.full(len(idx), np.inf)
    take = pa.array(entries, type=pa.int64())
    names = pc.binary_join_element_wise(objs.tag_keys.take(take), objs.tag_values.take(take), "=")
    common = pa.array(sorted(counts))
    slot = pc.index_in(names, value_set=common).to_numpy(zero_copy_only=False)
    per_entry = np.full(len(entries), np.inf)
    known = ~np.isnan(slot)
    totals = np.array([counts[t] for t in common.to_pylist()], dtype=np.float64)
    per_entry[known] = cap / totals[slot[known].astype(np.int64)]
    # Every object has at least one tag: its entries are one run from its first.
    first = np.cumsum(lengths) - lengths
    return np.maximum.reduceat(per_entry, first)


def sample_by_tag(
    objs: Objects, idx: np.ndarray, h: np.ndarray, counts: dict[str, int], cap: int
) -> np.ndarray:
    """Mask over ``idx``: per-tag quotas of about ``cap`` objects.

    An object is kept when its seeded random number is below ``cap / count`` for one of its
    tags (``count``: the tag's objects among all candidates of the plan). A tag on at most
    ``cap`` candidates (rare) keeps them all; a common tag keeps about ``cap``, plus those kept
    for a rarer co-tag. The decision needs only the object and the global counts, so it does
    not depend on how the objects are partitioned.
    """
    return uniform(h[idx], STREAM_SAMPLE) < sampling_threshold(objs, idx, counts, cap)


def limit_numbers(h: np.ndarray) -> np.ndarray:
    """The seeded random number that ranks requests for ``max_requests`` (lowest kept)."""
    return uniform(h, STREAM_LIMIT)


def _on_lattice(
    start: np.ndarray, gsd: np.ndarray, first: np.ndarray, last: np.ndarray
) -> np.ndarray:
    """``start`` moved to the nearer multiple of ``gsd`` within [first, last] (the other
    neighbour when the nearer one is out; unchanged in the rare case neither fits)."""
    down = np.floor(start / gsd) * gsd
    up = down + gsd
    near = np.where(start - down <= up - start, down, up)
    far = np.where(near == down, up, down)
    fits_near = (near >= first) & (near <= last)
    fits_far = (far >= first) & (far <= last)
    return np.where(fits_near, near, np.where(fits_far, far, start))


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
    around the object, so the object always stays inside. The corners then move (by at most
    one pixel, to the nearer whole pixel that keeps the object inside) onto the lattice of
    whole ``gsd`` pixels of the CRS, so that tiles of one source cut each other and the block
    requests that hold them exactly.
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
        start = _on_lattice(start, gsd, hi - side, lo)
        out[:, axis], out[:, axis + 2] = start, start + side
    return Frames(xy=out, lonlat=lonlat_box(epsg, out, proj.threads), pixels=pixels)
