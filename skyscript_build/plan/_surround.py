"""Surrounding objects of each tile: an STRtree bulk query, then vectorised filters and caps."""

from __future__ import annotations

import numpy as np
import shapely

from ._geo import STREAM_SURROUND, ProjectedBounds, mix64, uniform
from ._objects import Objects

#: Tiles queried at once (bounds the memory of the candidate pairs).
CHUNK = 20_000


def surroundings(
    objs: Objects,
    tree: shapely.STRtree,
    visible_gsd: np.ndarray,
    focus: np.ndarray,
    epsg: np.ndarray,
    gsd: np.ndarray,
    xy: np.ndarray,
    lonlat: np.ndarray,
    proj: ProjectedBounds,
    h: np.ndarray,
    cap: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (request, object) of the objects inside each tile, groundable at its GSD.

    An object is a surrounding object of tile ``r`` when it is not the focus object, lies
    entirely inside the tile (its bounds in the tile's CRS within the box) and has a tag
    visible at the tile's GSD (``visible_gsd >= gsd``). At most ``cap`` per tile, chosen in a
    seeded random order; the result is sorted by request, then object order.
    """
    reqs, objs_out = [], []
    for start in range(0, len(focus), CHUNK):
        sl = slice(start, start + CHUNK)
        r, j = _chunk(
            objs, tree, visible_gsd, focus[sl], epsg[sl], gsd[sl], xy[sl], lonlat[sl], proj
        )
        r = r + start
        if cap is not None and len(r):
            keep = _cap(r, j, focus, h, cap)
            r, j = r[keep], j[keep]
        reqs.append(r)
        objs_out.append(j)
    r = np.concatenate(reqs) if reqs else np.zeros(0, dtype=np.int64)
    j = np.concatenate(objs_out) if objs_out else np.zeros(0, dtype=np.int64)
    order = np.lexsort((j, r))
    return r[order], j[order]


def _chunk(objs, tree, visible_gsd, focus, epsg, gsd, xy, lonlat, proj):
    # Pad the lon/lat query box a little: it only has to hold every candidate.
    pad_x = (lonlat[:, 2] - lonlat[:, 0]) * 1e-3
    pad_y = (lonlat[:, 3] - lonlat[:, 1]) * 1e-3
    boxes = shapely.box(
        lonlat[:, 0] - pad_x, lonlat[:, 1] - pad_y, lonlat[:, 2] + pad_x, lonlat[:, 3] + pad_y
    )
    r, j = tree.query(boxes)
    keep = (j != focus[r]) & (visible_gsd[j] >= gsd[r] * (1 - 1e-9))
    r, j = r[keep], j[keep]
    if len(r) == 0:
        return r.astype(np.int64), j.astype(np.int64)
    pb = proj.get(epsg[r], j)
    box = xy[r]
    inside = (
        (pb[:, 0] >= box[:, 0])
        & (pb[:, 1] >= box[:, 1])
        & (pb[:, 2] <= box[:, 2])
        & (pb[:, 3] <= box[:, 3])
    )
    return r[inside].astype(np.int64), j[inside].astype(np.int64)


def _cap(r: np.ndarray, j: np.ndarray, focus: np.ndarray, h: np.ndarray, cap: int) -> np.ndarray:
    """Mask over pairs: at most ``cap`` per request, in a seeded random order."""
    key = uniform(h[j] ^ mix64(h[focus[r]]), STREAM_SURROUND)
    order = np.lexsort((j, key, r))
    rs = r[order]
    first = np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]])
    group_start = np.repeat(first, np.diff(np.r_[first, len(rs)]))
    keep = np.zeros(len(r), dtype=bool)
    keep[order[(np.arange(len(rs)) - group_start) < cap]] = True
    return keep
