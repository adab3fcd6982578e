"""Surrounding objects of each tile: an STRtree bulk query, then vectorised filters and caps.

A surrounding object of a tile is any other object that lies entirely inside the tile (its
bounds in the tile's CRS within the box) and has a tag visible at the tile's GSD. Where a tile
has more than ``cap`` of them, a seeded random subset is kept: every object has a priority drawn
from its hash, the tile keeps each candidate with a probability that leaves a little over
``cap`` on average, then the first ``cap`` in the spatial index's (deterministic) order. No
sort over candidate pairs is needed, so the cost is linear in the pairs the index returns.
"""

from __future__ import annotations

import numpy as np
import shapely

from ..progress import progress_bar
from ._geo import STREAM_SURROUND, ProjectedBounds, uniform
from ._objects import Objects

#: Tiles queried at once (bounds the memory of the candidate pairs).
CHUNK = 20_000


def surroundings(
    objs: Objects,
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
    """Pairs (request, object) of the surrounding objects of every tile, sorted by request.

    Tiles are handled in groups of one CRS and one GSD: each GSD gets an STRtree over the
    bounds' centres of only the objects visible at it (an object inside a box has its centre
    inside it), each CRS the objects' projected bounds as contiguous arrays.
    """
    priority = uniform(h, STREAM_SURROUND)
    b = objs.bounds
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    trees: dict[float, tuple[shapely.STRtree, np.ndarray, np.ndarray]] = {}
    position = np.full(len(objs), -1, dtype=np.int64)
    reqs, objs_out = [], []
    groups = sorted(set(zip(epsg.tolist(), gsd.tolist(), strict=True)))
    bar = progress_bar(total=len(focus), desc="plan: surroundings", unit="tile")
    for code, g in groups:
        tiles = np.flatnonzero((epsg == code) & (gsd == g))
        if g not in trees:
            members = np.flatnonzero(visible_gsd >= g * (1 - 1e-9))
            tree = shapely.STRtree(shapely.points(cx[members], cy[members]))
            trees[g] = (tree, members, priority[members])
        tree, members, prio = trees[g]
        if len(members) == 0:
            bar.update(len(tiles))
            continue
        ll = lonlat[tiles]
        envelope = (ll[:, 0].min(), ll[:, 1].min(), ll[:, 2].max(), ll[:, 3].max())
        pb = proj.region(int(code), b, _padded(envelope))[members]
        cols = [np.ascontiguousarray(pb[:, k]) for k in range(4)]
        position[members] = np.arange(len(members))
        focus_local = position[focus[tiles]]
        position[members] = -1
        for start in range(0, len(tiles), CHUNK):
            sel = slice(start, start + CHUNK)
            r, jl = _chunk(tree, focus_local[sel], xy[tiles[sel]], lonlat[tiles[sel]], cols)
            if cap is not None and len(r):
                keep = _cap(r, prio[jl], len(tiles[sel]), cap)
                r, jl = r[keep], jl[keep]
            reqs.append(tiles[sel][r].astype(np.int32))
            objs_out.append(members[jl].astype(np.int32))
            bar.update(len(tiles[sel]))
    bar.close()
    r = np.concatenate(reqs) if reqs else np.zeros(0, dtype=np.int32)
    j = np.concatenate(objs_out) if objs_out else np.zeros(0, dtype=np.int32)
    if len(groups) > 1:
        order = np.argsort(r, kind="stable")
        r, j = r[order], j[order]
    return r, j


def _padded(envelope: tuple, pad: float = 1e-3) -> tuple:
    w, s, e, n = envelope
    return (w - pad, s - pad, e + pad, n + pad)


def _chunk(tree, focus_local, xy, lonlat, cols):
    """Candidate pairs (tile, member) of the chunk's tiles: inside the box, not the focus."""
    # Pad the lon/lat query box a little: it only has to hold every candidate.
    pad_x = (lonlat[:, 2] - lonlat[:, 0]) * 1e-3
    pad_y = (lonlat[:, 3] - lonlat[:, 1]) * 1e-3
    boxes = shapely.box(
        lonlat[:, 0] - pad_x, lonlat[:, 1] - pad_y, lonlat[:, 2] + pad_x, lonlat[:, 3] + pad_y
    )
    r, j = tree.query(boxes)
    x0, y0, x1, y1 = (np.ascontiguousarray(xy[:, k]) for k in range(4))
    keep = (cols[0][j] >= x0[r]) & (cols[2][j] <= x1[r])
    r, j = r[keep], j[keep]
    keep = (cols[1][j] >= y0[r]) & (cols[3][j] <= y1[r]) & (j != focus_local[r])
    return r[keep].astype(np.int64), j[keep].astype(np.int64)


def _cap(r: np.ndarray, prio: np.ndarray, n: int, cap: int) -> np.ndarray:
    """Mask over pairs (sorted by ``r``): at most ``cap`` per tile, a seeded random subset.

    ``prio`` is each pair's object priority (uniform in [0, 1)).
    """
    counts = np.bincount(r, minlength=n)
    if counts.max(initial=0) <= cap:
        return np.ones(len(r), dtype=bool)
    # Keep each candidate with a probability that leaves a few more than cap on average ...
    p = np.minimum(1.0, (cap + 3.0 * np.sqrt(cap) + 3.0) / np.maximum(counts, 1))
    keep = prio < p[r]
    # ... then the first cap of those, in the index's order.
    rk = r[keep]
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rk, minlength=n), out=starts[1:])
    rank = np.arange(len(rk)) - starts[rk]
    kept = np.flatnonzero(keep)
    keep[kept[rank >= cap]] = False
    return keep
