"""Spatial shards of the plan: the surroundings and the parquet parts, one task per shard.

Requests are grouped by the cell of a fixed lon/lat grid (``shard_deg``) their tile's centre
falls in; a shard is one non-empty cell, numbered in (row, column) order. A shard task gets its
requests and the objects that can surround them (every object visible at one of the shard's
GSDs whose bounds lie in the padded union of the shard's tiles of that GSD: the halo is taken
from the tiles themselves, so a tile of any size is served), finds the surroundings and writes
its own parts (atomically, each with its stats). Shards and part numbers depend on the grid
only, never on the worker count, and a tile's surroundings do not depend on its shard, so the
rows equal the unsharded plan's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from image_sources import ImageSource

from ..files import write_json_atomic
from ._choose import ranges
from ._geo import ProjectedBounds, distinct
from ._objects import Objects
from ._output import build_table, write_parts
from ._surround import surroundings

#: Pad of a shard's halo box, as a fraction of its extent (plus an absolute 1e-6 degrees):
#: a tile's lon/lat box is its projected square's, whose edges may bow slightly outwards.
HALO_PAD = 1e-3


@dataclass
class ShardTask:
    """One shard: its requests (indices into ``objs``) and the objects around them."""

    number: int
    first_part: int
    objs: Objects
    visible: np.ndarray
    entry_gsd: np.ndarray
    h: np.ndarray
    focus: np.ndarray
    src: np.ndarray
    epsg: np.ndarray
    pixels: np.ndarray
    xy: np.ndarray
    lonlat: np.ndarray
    sources: Sequence[ImageSource]
    source_years: Sequence[tuple[int, ...]]
    cap: int
    out: Path
    rows_per_part: int
    threads: int
    #: Per EPSG code: the members' projected bounds and which of them are computed (every
    #: member visible at a tile's GSD in the tile's CRS is).
    projected: dict[int, tuple[np.ndarray, np.ndarray]]


def shard_cells(lonlat: np.ndarray, shard_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """The shard number of every tile (its centre's grid cell, ranked in row order) and the
    rows of each shard in order (a stable sort: the input order within a shard)."""
    cx = (lonlat[:, 0] + lonlat[:, 2]) / 2
    cy = (lonlat[:, 1] + lonlat[:, 3]) / 2
    col = np.floor((cx + 180.0) / shard_deg).astype(np.int64)
    row = np.floor((cy + 90.0) / shard_deg).astype(np.int64)
    cell = row * (int(360.0 / shard_deg) + 2) + col
    order = np.argsort(cell, kind="stable")
    in_order = cell[order]
    rank = np.cumsum(np.r_[True, in_order[1:] != in_order[:-1]]) - 1
    number = np.empty(len(cell), dtype=np.int64)
    number[order] = rank
    return number, order


class HaloIndex:
    """The objects' lon/lat bounds sorted by one key, (row of a lat grid holding their south
    edge, west edge to 2**-32 of the globe), so that the objects inside a box are one run of
    keys per row, found by binary search: each shard's halo costs a look at its own
    neighbourhood, not at every object."""

    def __init__(self, bounds: np.ndarray, row_deg: float, ids: np.ndarray) -> None:
        """``bounds`` of the objects ``ids``; ``inside`` answers with ``ids``."""
        self.row_deg = row_deg
        self.key = self._keys(np.floor((bounds[:, 1] + 90.0) / row_deg), bounds[:, 0])
        order = np.argsort(self.key)
        self.order = ids[order]
        self.key = self.key[order]
        self.bounds = bounds[order]

    @staticmethod
    def _keys(row: np.ndarray, lon: np.ndarray) -> np.ndarray:
        x = np.clip(np.floor((lon + 180.0) * (2.0**32 / 360.0)), 0, 2.0**32 - 1)
        return (row.astype(np.int64) << 32) | x.astype(np.int64)

    def inside(self, w: float, s: float, e: float, n: float) -> np.ndarray:
        """Sorted indices of the objects whose bounds lie inside (w, s, e, n)."""
        first = int(np.floor((s + 90.0) / self.row_deg))
        last = int(np.floor((n + 90.0) / self.row_deg))
        rows = np.arange(first, last + 1, dtype=np.float64)
        lo = np.searchsorted(self.key, self._keys(rows, np.full(len(rows), w)), "left")
        hi = np.searchsorted(self.key, self._keys(rows, np.full(len(rows), e)), "right")
        cand = ranges(lo, hi - lo)
        bc = self.bounds[cand]
        ok = (bc[:, 0] >= w) & (bc[:, 2] <= e) & (bc[:, 1] >= s) & (bc[:, 3] <= n)
        return np.sort(self.order[cand[ok]])


def halo_indexes(
    bounds: np.ndarray, visible: np.ndarray, gsds: np.ndarray, row_deg: float
) -> dict[float, HaloIndex]:
    """A ``HaloIndex`` per tile GSD of the objects visible at it (sparse for coarse GSDs)."""
    out = {}
    for g in distinct(gsds).tolist():
        rows = np.flatnonzero(visible >= g * (1 - 1e-9))
        out[g] = HaloIndex(bounds[rows], row_deg, rows)
    return out


def halo_members(
    indexes: dict[float, HaloIndex], gsd: np.ndarray, lonlat: np.ndarray
) -> np.ndarray:
    """Sorted indices of the objects that may surround some of the tiles ``lonlat``: visible at
    a tile's GSD and inside the padded union box of the tiles of that GSD."""
    found = []
    for g in distinct(gsd).tolist():
        box = lonlat[gsd == g]
        w, s = float(box[:, 0].min()), float(box[:, 1].min())
        e, n = float(box[:, 2].max()), float(box[:, 3].max())
        pad_x, pad_y = (e - w) * HALO_PAD + 1e-6, (n - s) * HALO_PAD + 1e-6
        found.append(indexes[g].inside(w - pad_x, s - pad_y, e + pad_x, n + pad_y))
    if len(found) == 1:
        return found[0]
    return distinct(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def subset(objs: Objects, rows: np.ndarray) -> tuple[Objects, np.ndarray]:
    """The objects ``rows`` (sorted), as their own ``Objects`` (tags re-offset; no geometry),
    and the indices of their tag entries in ``objs``."""
    starts = objs.tag_offsets[rows]
    lengths = objs.tag_offsets[rows + 1] - starts
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    entries = ranges(starts, lengths)
    take = pa.array(entries, type=pa.int64())
    return Objects(
        osm_type=objs.osm_type[rows],
        osm_id=objs.osm_id[rows],
        osm_element=objs.osm_element[rows],
        kind=objs.kind[rows],
        element=objs.element[rows],
        geometry=np.zeros(0, dtype=object),  # shards use the projected bounds given
        bounds=objs.bounds[rows],
        max_gsd=objs.max_gsd[rows],
        tag_offsets=offsets,
        tag_keys=objs.tag_keys.take(take),
        tag_values=objs.tag_values.take(take),
        tag_code=objs.tag_code[entries],
        tag_names=[],
        dropped={},
    ), entries


def run_shard(task: ShardTask) -> dict[str, Any]:
    """Find one shard's surroundings and write its parts; returns its counts."""
    objs = task.objs
    cpu0 = time.thread_time()  # this thread only: shards may run on threads side by side
    gsd = np.array([s.gsd for s in task.sources], dtype=np.float64)[task.src]
    if task.cap > 0 and len(task.focus):
        proj = ProjectedBounds(objs.geometry, task.threads, task.projected)
        pair_req, pair_obj = surroundings(
            objs, task.visible, task.focus, task.epsg, gsd, task.xy, task.lonlat, proj,
            task.h, task.cap, task.threads,
        )  # fmt: skip
        del proj
    else:
        pair_req = pair_obj = np.zeros(0, dtype=np.int64)
    cpu1 = time.thread_time()

    def build(start: int, stop: int) -> Any:
        lo, hi = np.searchsorted(pair_req, [start, stop])
        part = slice(start, stop)
        return build_table(
            objs, task.sources, task.source_years, task.focus[part], task.src[part],
            task.epsg[part], task.xy[part], task.lonlat[part], task.pixels[part],
            task.entry_gsd, pair_req[lo:hi] - start, pair_obj[lo:hi],
        )  # fmt: skip

    parts = write_parts(
        build, len(task.focus), task.out, task.rows_per_part, task.threads, task.first_part
    )
    pa.default_memory_pool().release_unused()  # arrow's allocator keeps freed pages else
    result = {
        "shard": task.number,
        "parts": len(parts),
        "surrounding": int(len(pair_req)),
        "cpu_surround": cpu1 - cpu0,
        "cpu_write": time.thread_time() - cpu1,
    }
    write_json_atomic(shard_done_path(task.out, task.number), result)  # last: the shard is done
    return result


def shard_done_path(out: Path, number: int) -> Path:
    """The file a shard writes after all its parts (its counts): a rerun skips the shard."""
    return out / "_stats" / f"shard-{number:05d}.json"
