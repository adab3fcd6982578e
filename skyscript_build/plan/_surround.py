"""Surrounding objects of each tile: a sorted strip index, vectorised bounds checks and caps.

A surrounding object of a tile is any other object that lies entirely inside the tile (its
bounds in the tile's CRS within the box) and has a tag visible at the tile's GSD. Tiles are
handled in groups of one CRS and one GSD. The group's members (objects visible at the GSD and
near one of its tiles) are sorted by (strip of their lower edge, left edge): the members whose
lower-left corner lies in a tile are then one contiguous run per strip the tile spans, found
with ``searchsorted``; plain numpy comparisons of the bounds keep the ones entirely inside. No
spatial tree, no GEOS call and no Python loop per tile; chunks of tiles run on threads (numpy
releases the GIL), and the result does not depend on the chunking or the thread count.

Where a tile has more than ``cap`` surrounding objects, a seeded random subset is kept: every
object has a priority drawn from its hash and the tile keeps the ``cap`` of lowest priority;
a tile lists its objects in object order. A tile's result depends only on the tile and the
objects, never on the grouping, chunking, threads or shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..progress import progress_bar
from ._choose import ranges
from ._geo import STREAM_SURROUND, ProjectedBounds, uniform
from ._objects import Objects

#: Candidate pairs looked at in one chunk of tiles (bounds the memory of a chunk).
CHUNK_PAIRS = 250_000
#: Strips per (median) tile side: more strips, fewer wasted candidates, more searches.
STRIPS_PER_TILE = 4
#: Tiles per block (a block's tiles go through the levels together, on one thread).
BLOCK_TILES = 16_384
#: Priority levels: level m holds the members of priority below 2**-m.
LEVELS = 6
#: Guessed share of a tile's candidates that lie inside it, and the margin over the cap
#: wanted in a level before it is used (a wrong guess only costs a retry).
INSIDE_GUESS = 0.75
CAP_MARGIN = 1.15
#: Bits of the millimetre x offset in the sort key (the strip number sits above them).
_X_BITS = 36
_X_SPAN = 1 << _X_BITS
#: Bits of the tile (within a block) and of the priority in the cap's sort key.
_R_BITS = 15
_P_BITS = 62 - _R_BITS


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
    cap: int | None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (request, object) of the surrounding objects of every tile, sorted by request.

    Args:
        objs: all objects (their lon/lat ``bounds``).
        visible_gsd: per object, the coarsest GSD one of its tags is visible at.
        focus: the object of each request; ``epsg``, ``gsd``, ``xy``, ``lonlat``: its tile.
        proj: projected bounds of the objects (computed here where missing).
        h: per-object seeded hash (the cap's priorities).
        cap: most surrounding objects per tile (None: all).
        threads: chunks of tiles checked at once.
    """
    priority = uniform(h, STREAM_SURROUND)
    b = objs.bounds
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    groups = sorted(set(zip(epsg.tolist(), gsd.tolist(), strict=True)))
    bar = progress_bar(total=len(focus), desc="plan: surroundings", unit="tile")
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for code, g in groups:
            tiles = np.flatnonzero((epsg == code) & (gsd == g))
            visible = np.flatnonzero(visible_gsd >= g * (1 - 1e-9))
            members = visible[_near(lonlat[tiles], cx[visible], cy[visible])]
            if len(members):
                pb = proj.get(np.full(len(members), code, dtype=np.int64), members)
                for r, j in _group_pairs(pb, members, priority[members], xy[tiles],
                                         focus[tiles], cap, pool):  # fmt: skip
                    pieces.append((tiles[r].astype(np.int32), j.astype(np.int32)))
            bar.update(len(tiles))
    bar.close()
    return _merge(pieces, len(focus))


def _group_pairs(
    pb: np.ndarray,
    members: np.ndarray,
    priority: np.ndarray,
    boxes: np.ndarray,
    focus: np.ndarray,
    cap: int | None,
    pool: ThreadPoolExecutor,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The capped pairs (tile, object) of one (CRS, GSD) group, in pieces sorted by tile.

    Each tile is looked up in the sparsest priority level that is expected to hold ``cap``
    of its surrounding objects (estimated from its candidates in the full level), and in the
    next denser level when it does not; the result depends only on the tile's own objects.
    """
    sides = boxes[:, 2] - boxes[:, 0]
    y_span = float(pb[:, 1].max() - pb[:, 1].min())
    # At most 2**26 strips, so that the strip number fits above the x bits.
    height = max(float(np.median(sides)) / STRIPS_PER_TILE, y_span / 2**26, 1e-3)
    n_strips = int(y_span / height) + 1
    base = (float(pb[:, 0].min()), float(pb[:, 1].min()), height, n_strips)
    levels = []
    for m in range(LEVELS if cap else 1):
        sel = np.flatnonzero(priority < 0.5**m)
        levels.append(_Level(pb[sel], members[sel], priority[sel] * 2.0**m, focus, base))
    cols = [np.ascontiguousarray(boxes[:, k]) for k in range(4)]
    blocks = [
        np.arange(k, min(len(boxes), k + BLOCK_TILES)) for k in range(0, len(boxes), BLOCK_TILES)
    ]

    def block(tiles: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return _block_pairs(levels, boxes, cols, tiles, cap)

    for pieces in pool.map(block, blocks):
        yield from pieces


def _block_pairs(
    levels: list[_Level],
    boxes: np.ndarray,
    cols: list[np.ndarray],
    tiles: np.ndarray,
    cap: int | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The capped pairs of some tiles of a group (see ``_group_pairs``), in pieces."""
    level = np.zeros(len(tiles), dtype=np.int64)
    if cap and len(levels) > 1:
        tile, _, length = levels[0].runs(boxes, tiles)
        cand = np.bincount(tile - tiles[0], weights=length, minlength=len(tiles))
        ratio = INSIDE_GUESS * cand / (cap * CAP_MARGIN)
        level = np.clip(np.floor(np.log2(np.maximum(ratio, 1.0))), 0, len(levels) - 1)
        level = level.astype(np.int64)
    out = []
    retry = np.zeros(0, dtype=np.int64)
    for m in range(len(levels) - 1, -1, -1):
        todo = np.union1d(tiles[level == m], retry)
        retry = np.zeros(0, dtype=np.int64)
        if len(todo) == 0:
            continue
        run_tile, run_start, run_len = levels[m].runs(boxes, todo)
        for c in _chunks(run_tile, run_len):
            r, j, short = levels[m].pairs(cols, run_tile[c], run_start[c], run_len[c], cap, m > 0)
            retry = np.r_[retry, short]
            out.append((r, j))
    return out


def _near(lonlat: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Mask: the point (cx, cy) lies in a cell of a coarse lon/lat grid that some tile's box
    (padded) touches. Every object inside a tile has its centre inside the tile's box."""
    if len(lonlat) == 0 or len(cx) == 0:
        return np.zeros(len(cx), dtype=bool)
    pad_x = (lonlat[:, 2] - lonlat[:, 0]) * 1e-3 + 1e-9
    pad_y = (lonlat[:, 3] - lonlat[:, 1]) * 1e-3 + 1e-9
    w, s = lonlat[:, 0] - pad_x, lonlat[:, 1] - pad_y
    e, n = lonlat[:, 2] + pad_x, lonlat[:, 3] + pad_y
    x0, y0 = float(w.min()), float(s.min())
    cell = float(np.median(np.maximum(e - w, n - s)))
    span = max(float(e.max()) - x0, float(n.max()) - y0)
    cell = max(cell, span / 2048)  # at most 2048 x 2048 cells
    nx = int((float(e.max()) - x0) / cell) + 2
    ny = int((float(n.max()) - y0) / cell) + 2
    i0, i1 = ((w - x0) / cell).astype(np.int64), ((e - x0) / cell).astype(np.int64) + 1
    j0, j1 = ((s - y0) / cell).astype(np.int64), ((n - y0) / cell).astype(np.int64) + 1
    # A 2-D difference array: +1 at each box's corner, summed along both axes.
    diff = np.zeros((ny + 1) * (nx + 1), dtype=np.int64)
    for jj, ii, sign in ((j0, i0, 1), (j0, i1, -1), (j1, i0, -1), (j1, i1, 1)):
        diff += sign * np.bincount(jj * (nx + 1) + ii, minlength=len(diff))
    covered = diff.reshape(ny + 1, nx + 1).cumsum(axis=0).cumsum(axis=1) > 0
    pi = np.floor((cx - x0) / cell)
    pj = np.floor((cy - y0) / cell)
    inside = (pi >= 0) & (pi < nx) & (pj >= 0) & (pj < ny)
    out = np.zeros(len(cx), dtype=bool)
    out[inside] = covered[pj[inside].astype(np.int64), pi[inside].astype(np.int64)]
    return out


def _chunks(run_tile: np.ndarray, run_len: np.ndarray) -> list[slice]:
    """Slices of runs (sorted by tile), whole tiles each, of about CHUNK_PAIRS candidates."""
    if len(run_tile) == 0:
        return []
    ends = np.flatnonzero(np.r_[run_tile[1:] != run_tile[:-1], True]) + 1
    upto = np.cumsum(run_len)[ends - 1] // CHUNK_PAIRS
    cuts = ends[np.flatnonzero(np.diff(upto) > 0)]
    bounds = [0, *cuts.tolist(), len(run_tile)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _merge(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate pieces (each sorted by tile, no tile in two pieces) into tile order."""
    if not pieces:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    counts = np.bincount(np.concatenate([r for r, _ in pieces]), minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out_r = np.repeat(np.arange(n, dtype=np.int32), counts)
    out_j = np.empty(int(offsets[-1]), dtype=np.int32)
    for r, j in pieces:
        if len(r) == 0:
            continue
        first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        rank = np.arange(len(r)) - np.repeat(first, np.diff(np.r_[first, len(r)]))
        out_j[offsets[r] + rank] = j
    return out_r, out_j


def _search(key: np.ndarray, queries: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``searchsorted(key, queries, "left")``, the queries taken in ``order`` (sorted, or
    nearly: numpy's search starts from the previous answer, much faster on sorted queries)."""
    out = np.empty(len(queries), dtype=np.int64)
    out[order] = np.searchsorted(key, queries[order], "left")
    return out


class _Level:
    """Members (all, or those of priority below 2**-m) sorted by (strip of y_min, x_min mm)."""

    def __init__(
        self,
        pb: np.ndarray,
        members: np.ndarray,
        priority: np.ndarray,
        focus: np.ndarray,
        base: tuple[float, float, float, int],
    ) -> None:
        self.x_base, self.y_base, self.height, self.n_strips = base
        strip = np.floor((pb[:, 1] - self.y_base) / self.height).astype(np.int64)
        xq = np.clip(np.floor((pb[:, 0] - self.x_base) * 1000.0), 0, _X_SPAN - 1)
        key = (strip << _X_BITS) | xq.astype(np.int64)
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.cols = [np.ascontiguousarray(pb[order, k]) for k in range(4)]
        self.members = members[order]
        self.priority = priority[order]
        # The sorted position of each tile's own object (-1: not a member).
        size = int(max(members.max(initial=0), focus.max(initial=0))) + 1
        position = np.full(size, -1, dtype=np.int64)
        position[self.members] = np.arange(len(self.members))
        self.focus = position[focus]

    def runs(self, boxes: np.ndarray, tiles: np.ndarray) -> tuple:
        """Per (tile, strip) of ``tiles``: (tile, start, length) of the run of sorted members
        whose lower-left corner may lie in the tile (x to a millimetre)."""
        b = boxes[tiles]
        s_lo = np.floor((b[:, 1] - self.y_base) / self.height).astype(np.int64)
        s_hi = np.floor((b[:, 3] - self.y_base) / self.height).astype(np.int64)
        s_lo = np.clip(s_lo, 0, self.n_strips)
        s_hi = np.clip(s_hi, -1, self.n_strips - 1)
        count = np.maximum(s_hi - s_lo + 1, 0)
        which = np.repeat(np.arange(len(tiles)), count)
        strip = ranges(s_lo, count) << _X_BITS
        lo = np.clip(np.floor((b[:, 0] - self.x_base) * 1000.0), 0, _X_SPAN).astype(np.int64)
        hi = np.clip(np.floor((b[:, 2] - self.x_base) * 1000.0) + 1, 0, _X_SPAN)
        lo_key = strip + lo[which]
        order = np.argsort(lo_key)
        start = _search(self.key, lo_key, order)
        stop = _search(self.key, strip + hi.astype(np.int64)[which], order)
        return tiles[which], start, stop - start

    def pairs(
        self,
        boxes: list[np.ndarray],
        run_tile: np.ndarray,
        run_start: np.ndarray,
        run_len: np.ndarray,
        cap: int | None,
        may_retry: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tile, object) pairs of the runs' tiles, sorted by tile: inside the box, not the
        tile's own object, capped; and the tiles with fewer than ``cap`` (to retry denser)."""
        cand = ranges(run_start, run_len)
        x0, y0, x1, y1 = self.cols
        # x first (most candidates pass), then y on the survivors only.
        bx0, by0, bx1, by1 = boxes
        keep = x1[cand] <= np.repeat(bx1[run_tile], run_len)
        keep &= x0[cand] >= np.repeat(bx0[run_tile], run_len)
        sel = np.flatnonzero(keep)
        cand = cand[sel]
        tile = np.repeat(run_tile, run_len)[sel]
        keep = y1[cand] <= by1[tile]
        keep &= y0[cand] >= by0[tile]
        keep &= cand != self.focus[tile]
        cand, tile = cand[keep], tile[keep]
        short = np.zeros(0, dtype=np.int64)
        if len(run_tile) == 0:
            return tile, self.members[cand], short
        first = int(run_tile[0])
        n = int(run_tile[-1]) - first + 1
        local = tile - first
        if cap is not None and may_retry:
            counts = np.bincount(local, minlength=n)
            has_runs = np.zeros(n, dtype=bool)
            has_runs[run_tile - first] = True
            few = has_runs & (counts < cap)
            if few.any():
                short = np.flatnonzero(few) + first
                ok = ~few[local]
                cand, tile, local = cand[ok], tile[ok], local[ok]
        r, j = _cap(local, self.priority[cand], self.members[cand], n, cap)
        return r + first, j, short


def _cap(
    r: np.ndarray, prio: np.ndarray, member: np.ndarray, n: int, cap: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (tile ``r``, object ``member``) kept, sorted by (tile, object).

    A tile keeps the ``cap`` of its objects with the lowest priority (``prio``, seeded per
    object; ties broken by the object): the same objects whatever else is in the index, so the
    result does not depend on how tiles are grouped or sharded. Within a tile, object order.
    """
    r = r.astype(np.int64)
    member = member.astype(np.int64)
    if cap is not None and np.bincount(r, minlength=n).max(initial=0) > cap:
        if n < 1 << _R_BITS:
            # One int64 sort key: the tile above the priority's top bits.
            key = (r << _P_BITS) | (prio * float(1 << _P_BITS)).astype(np.int64)
            order = np.argsort(key)
            ks = key[order]
            if (ks[1:] == ks[:-1]).any():  # equal priorities (rare): sort by object too
                order = np.lexsort((member, prio, r))
        else:
            order = np.lexsort((member, prio, r))
        rs = r[order]
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rs, minlength=n), out=starts[1:])
        sel = order[np.arange(len(rs)) - starts[rs] < cap]
        r, member = r[sel], member[sel]
    key = np.sort((r << 32) | member)
    return key >> 32, key & 0xFFFFFFFF
