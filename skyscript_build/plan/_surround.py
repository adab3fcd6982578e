"""Surrounding objects of each tile: a sorted strip index walked by a compiled kernel.

A surrounding object of a tile is any other object that lies entirely inside the tile (its
bounds in the tile's CRS within the box) and has a tag visible at the tile's GSD. Tiles are
handled in groups of one CRS and one GSD. The group's members (objects visible at the GSD and
near one of its tiles) are sorted by (strip of their lower edge, left edge): the members whose
lower-left corner lies in a tile are then one run per strip the tile spans, found by binary
search. A numba kernel (no GIL, blocks of tiles on threads) walks the runs and checks the
bounds; the result does not depend on the blocks or the thread count.

Where a tile has more than ``cap`` surrounding objects, a seeded random subset is kept: every
object has a priority drawn from its hash and the tile keeps the ``cap`` of lowest priority
(ties: the lower object index); a tile lists its objects in object order. A tile's result
depends only on the tile and the objects, never on the grouping, blocks, threads or shards.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numba
import numpy as np

from ._geo import STREAM_SURROUND, ProjectedBounds, uniform
from ._objects import Objects

#: Strips per (median) tile side: more strips, fewer wasted candidates, more searches.
STRIPS_PER_TILE = 4
#: Tiles per block (one kernel call, on one thread).
BLOCK_TILES = 16_384
#: Pairs one kernel call returns at most (unless one tile has more).
OUT_PAIRS = 1 << 22
#: Priority levels of the index: level m holds the members of priority below 2**-m.
LEVELS = 8
#: Guessed share of a tile's run members that lie inside it, and the margin over the cap
#: wanted in a level before it is used (a wrong guess only costs a second scan).
INSIDE_GUESS = 0.7
CAP_MARGIN = 1.2
#: Most strips of one group's index (bounds the index's memory for tiny tiles).
MAX_STRIPS = 1 << 22


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
    """Pairs (request, object) of the surrounding objects of every tile, sorted by request
    and, within a request, by object.

    Args:
        objs: all objects (their lon/lat ``bounds``).
        visible_gsd: per object, the coarsest GSD one of its tags is visible at.
        focus: the object of each request; ``epsg``, ``gsd``, ``xy``, ``lonlat``: its tile.
        proj: projected bounds of the objects (computed here where missing).
        h: per-object seeded hash (the cap's priorities).
        cap: most surrounding objects per tile (None: all).
        threads: blocks of tiles checked at once.
    """
    priority = uniform(h, STREAM_SURROUND)
    b = objs.bounds
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    limit = np.iinfo(np.int64).max if cap is None else int(cap)
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    groups = sorted(set(zip(epsg.tolist(), gsd.tolist(), strict=True)))
    with ThreadPoolExecutor(max_workers=threads) if threads > 1 else nullcontext() as pool:
        for code, g in groups:
            tiles = np.flatnonzero((epsg == code) & (gsd == g))
            visible = np.flatnonzero(visible_gsd >= g * (1 - 1e-9))
            members = visible[_near(lonlat[tiles], cx[visible], cy[visible])]
            if len(members):
                pb = proj.get(np.full(len(members), code, dtype=np.int64), members)
                levels = LEVELS if limit < len(members) else 1
                index = _StripIndex(pb, members, priority[members], xy[tiles], levels)

                def block(t: np.ndarray, index: _StripIndex = index) -> tuple:
                    r, j = index.pairs(xy[t], focus[t], limit)
                    return t[r], j  # the block's tile numbers are local to it

                blocks = [tiles[k : k + BLOCK_TILES] for k in range(0, len(tiles), BLOCK_TILES)]
                pieces.extend(pool.map(block, blocks) if pool else map(block, blocks))
    return _merge(pieces, len(focus))


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


def _merge(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate pieces (each sorted by tile, no tile in two pieces) into tile order."""
    if not pieces:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    firsts = [int(r[0]) for r, _ in pieces if len(r)]
    lasts = [int(r[-1]) for r, _ in pieces if len(r)]
    if all(a > b for a, b in zip(firsts[1:], lasts[:-1], strict=True)):
        # Already in tile order (one group, or groups that do not interleave): concatenate.
        return np.concatenate([r for r, _ in pieces]), np.concatenate([j for _, j in pieces])
    counts = np.zeros(n, dtype=np.int64)
    for r, _ in pieces:
        _count(r, counts)
    next_slot = np.zeros(n, dtype=np.int64)
    np.cumsum(counts[:-1], out=next_slot[1:])
    out_j = np.empty(int(counts.sum()), dtype=np.int64)
    for r, j in pieces:
        _scatter(r, j, next_slot, out_j)
    return np.repeat(np.arange(n, dtype=np.int64), counts), out_j


@numba.njit(nogil=True, cache=True)
def _count(r, counts):
    for i in range(len(r)):
        counts[r[i]] += 1


@numba.njit(nogil=True, cache=True)
def _scatter(r, j, next_slot, out_j):
    """Put each ``j[i]`` at the next free slot of tile ``r[i]`` (keeps a piece's order)."""
    for i in range(len(r)):
        out_j[next_slot[r[i]]] = j[i]
        next_slot[r[i]] += 1


def warm_up() -> None:
    """Compile the kernel (or load it from numba's cache) on a tiny input: about half a second
    of numba's start-up that a caller can overlap with other work."""
    tile = np.array([[0.0, 0.0, 2.0, 2.0]])
    index = _StripIndex(tile / 2, np.zeros(1, np.int64), np.zeros(1), tile, 2)
    r, j = index.pairs(tile, np.ones(1, np.int64), 1)
    _merge([(r + 1, j), (r, j)], 2)  # interleaved pieces: the scatter kernels


class _StripIndex:
    """A group's members, per priority level, sorted by (strip of y_min, x_min).

    Level m holds the members of priority below 2**-m (level 0: all), so that a tile with
    many more than ``cap`` objects inside looks only at a sparse level that still holds its
    ``cap`` of lowest priority. The levels are concatenated; ``strip_start[m, s]`` is the first
    row of strip ``s`` of level ``m``.
    """

    def __init__(
        self,
        pb: np.ndarray,
        members: np.ndarray,
        priority: np.ndarray,
        boxes: np.ndarray,
        levels: int,
    ) -> None:
        sides = boxes[:, 2] - boxes[:, 0]
        self.y_base = float(pb[:, 1].min())
        y_span = float(pb[:, 1].max()) - self.y_base
        self.height = max(float(np.median(sides)) / STRIPS_PER_TILE, y_span / MAX_STRIPS, 1e-3)
        n_strips = int(y_span / self.height) + 1
        strip = np.floor((pb[:, 1] - self.y_base) / self.height).astype(np.int64)
        order = np.lexsort((pb[:, 0], strip))
        rows = [order[priority[order] < 0.5**m] for m in range(levels)]
        self.strip_start = np.zeros((levels, n_strips + 1), dtype=np.int64)
        first = 0
        for m, level in enumerate(rows):
            counts = np.bincount(strip[level], minlength=n_strips)
            self.strip_start[m, 0] = first
            np.cumsum(counts, out=self.strip_start[m, 1:])
            self.strip_start[m, 1:] += first
            first += len(level)
        every = np.concatenate(rows)
        self.x0, self.y0, self.x1, self.y1 = (np.ascontiguousarray(pb[every, k]) for k in range(4))
        self.members = np.ascontiguousarray(members[every], dtype=np.int64)
        self.priority = np.ascontiguousarray(priority[every])
        self.n_members = len(members)

    def pairs(
        self, boxes: np.ndarray, focus: np.ndarray, cap: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(tile, object) pairs of ``boxes`` (tile numbers local to them), capped."""
        bx0, by0, bx1, by1 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
        focus = focus.astype(np.int64)
        most = min(cap, self.n_members)  # surrounding objects of one tile, at most
        size = max(min(len(boxes) * min(most, 64), OUT_PAIRS), most)
        pieces, start = [], 0
        while start < len(boxes):
            r, j, start = _tiles_pairs(
                self.x0, self.y0, self.x1, self.y1, self.members, self.priority,
                self.strip_start, self.y_base, self.height, bx0, by0, bx1, by1, focus, cap,
                start, size,
            )  # fmt: skip
            pieces.append((r, j))
        r = np.concatenate([r for r, _ in pieces])
        j = np.concatenate([j for _, j in pieces])
        # Each tile's objects in object order: one sort of (tile, object) keys (numpy's sort
        # is several times faster than sorting each tile's few objects in the kernel).
        key = np.sort((r << 32) | j)
        return key >> 32, key & 0xFFFFFFFF


@numba.njit(nogil=True, cache=True, inline="always")
def _strips(by0: float, by1: float, y_base: float, height: float, n_strips: int) -> tuple:
    lo = min(max(int(np.floor((by0 - y_base) / height)), 0), n_strips)
    hi = min(max(int(np.floor((by1 - y_base) / height)), -1), n_strips - 1)
    return lo, hi


@numba.njit(nogil=True, cache=True)
def _tiles_pairs(
    x0, y0, x1, y1, members, priority, strip_start, y_base, height, bx0, by0, bx1, by1, focus,
    cap, start, size,
):  # fmt: skip
    """The pairs (tile, object) of tiles ``start:`` of ``b*``: the members inside each tile
    (its own object left out), at most ``cap`` (the lowest priorities, ties by object), by
    tile; at most ``size`` pairs, whole tiles. Returns them and the first tile
    not done.

    A tile starts at the sparsest level expected to hold ``cap`` of its objects (from the
    length of its runs in level 0) and goes one level denser while it finds fewer; over the cap,
    a quickselect keeps the lowest.
    """
    n_levels, n_strips = strip_start.shape[0], strip_start.shape[1] - 1
    n_members = strip_start[0, n_strips] - strip_start[0, 0]
    out_r = np.empty(size, dtype=np.int64)
    out_j = np.empty(size, dtype=np.int64)
    n_out = 0
    found_p = np.empty(n_members, dtype=np.float64)
    found_m = np.empty(n_members, dtype=np.int64)
    for t in range(start, len(bx0)):
        lo, hi = _strips(by0[t], by1[t], y_base, height, n_strips)
        level = 0
        if n_levels > 1 and cap < n_members:
            runs = 0
            for s in range(lo, hi + 1):
                a, b = strip_start[0, s], strip_start[0, s + 1]
                runs += np.searchsorted(x0[a:b], bx1[t], "right")
                runs -= np.searchsorted(x0[a:b], bx0[t])
            expected = INSIDE_GUESS * runs / (cap * CAP_MARGIN)
            while level + 1 < n_levels and expected >= 2.0 ** (level + 1):
                level += 1
        while True:
            n = 0
            for s in range(lo, hi + 1):
                a, b = strip_start[level, s], strip_start[level, s + 1]
                i = a + np.searchsorted(x0[a:b], bx0[t])
                while i < b and x0[i] <= bx1[t]:
                    inside = x1[i] <= bx1[t] and y0[i] >= by0[t] and y1[i] <= by1[t]
                    if inside and members[i] != focus[t]:
                        found_p[n], found_m[n] = priority[i], members[i]
                        n += 1
                    i += 1
            if n >= cap or level == 0:
                break
            level -= 1  # too few at this level: the next denser one holds more
        if n > cap:
            _select(found_p, found_m, n, cap)
            n = cap
        if n_out + n > size:
            return out_r[:n_out], out_j[:n_out], t  # full: tile t again in the next call
        out_r[n_out : n_out + n] = t
        out_j[n_out : n_out + n] = found_m[:n]
        n_out += n
    return out_r[:n_out], out_j[:n_out], len(bx0)


@numba.njit(nogil=True, cache=True, inline="always")
def _less(p, m, q, k):
    """(p, m) sorts before (q, k)."""
    return p < q or (p == q and m < k)


@numba.njit(nogil=True, cache=True)
def _select(prio, member, n, k):
    """Reorder ``prio[:n]``, ``member[:n]`` so that the ``k`` smallest (priority, member)
    come first (quickselect, Hoare's partition; members are distinct)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        pivot_p, pivot_m = prio[mid], member[mid]
        i, j = lo, hi
        while i <= j:
            while _less(prio[i], member[i], pivot_p, pivot_m):
                i += 1
            while _less(pivot_p, pivot_m, prio[j], member[j]):
                j -= 1
            if i <= j:
                prio[i], prio[j] = prio[j], prio[i]
                member[i], member[j] = member[j], member[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            break
