"""Pass 1 of the plan: one task per read unit of the objects (a few row groups of a part).

A scan task reads the small columns of its objects (ids, tags, box, ``max_gsd``; never the
geometry), judges every tag's visibility, chooses each object's image source and tile size,
and writes three files into the plan's work folder:

- ``<name>.scan``: its objects with those decisions (``_scanfile``), sorted by ``key``: their
  visibility level (how many of the run's source GSDs they are visible at), then the cell of
  the fixed lon/lat grid (``Grid``) holding their box's centre, then object order (a halo for
  tiles of a coarse GSD reads only the objects visible at it);
- ``<name>.tags.parquet``: per ``key=value`` tag, how many candidates (objects with a source)
  carry it: summed over all tasks, the global counts behind the per-tag quotas;
- ``<name>.cells.parquet``: objects per grid cell, from which the partitions are cut;
- ``<name>.relations.npy``: the keys (``osm_id``, source) of its relation areas with a
  source: a way area with the same number and source gives way to them (same file name).

Memory is the unit's, whatever the input's size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from image_sources import ImageSource

from ..files import atomic_path
from ..runner import ShardRecord
from ._choose import choose_sources
from ._geo import ProjectedBounds, ranges
from ._objects import Objects, ReadUnit, read_unit
from ._scanfile import Rows, write_scan_file

#: A scan row's key is ``level * LEVEL_STRIDE + cell``.
LEVEL_STRIDE = 1 << 44
#: Relation keys are ``osm_id * MAX_SOURCES + source``.
MAX_SOURCES = 1024
#: Fine cells per side of a block (a block is ``shard_deg`` wide: the partitions' unit).
CELLS_PER_BLOCK = 8


@dataclass(frozen=True)
class Grid:
    """The fixed lon/lat grid of the plan: blocks ``block_deg`` wide (``shard_deg``), each of
    ``CELLS_PER_BLOCK`` x ``CELLS_PER_BLOCK`` cells. A cell's number is ``row * columns + col``.

    ``levels``: the run's source GSDs, ascending. An object's level is how many of them it is
    visible at (its coarsest visible GSD at least the level's), so the objects visible at
    ``levels[i]`` are those of level ``i + 1`` and up.
    """

    block_deg: float
    levels: tuple[float, ...] = ()

    def level(self, visible: np.ndarray) -> np.ndarray:
        """The level of objects visible up to ``visible`` metres."""
        edges = np.array(self.levels, dtype=np.float64) * (1 - 1e-9)
        return np.searchsorted(edges, visible, side="right").astype(np.int64)

    def first_level(self, gsd: float) -> int:
        """The lowest level whose objects are visible at ``gsd``."""
        return int(self.level(np.array([gsd]))[0])

    @property
    def cell_deg(self) -> float:
        return self.block_deg / CELLS_PER_BLOCK

    @property
    def columns(self) -> int:
        return math.ceil(360.0 / self.cell_deg) + 1

    def rows_cols(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (row, column) of the cells holding points, clipped to the globe."""
        col = np.floor((np.clip(lon, -180.0, 180.0) + 180.0) / self.cell_deg).astype(np.int64)
        row = np.floor((np.clip(lat, -90.0, 90.0) + 90.0) / self.cell_deg).astype(np.int64)
        return row, np.minimum(col, self.columns - 1)

    def cells(self, bounds: np.ndarray) -> np.ndarray:
        """The cell key of every box's centre."""
        row, col = self.rows_cols(
            (bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2
        )
        return row * self.columns + col

    def cell_ranges(self, rect: tuple[int, int, int, int]) -> list[tuple[int, int]]:
        """The half-open ranges of cell numbers of ``rect`` (row0, col0, rows, cols)."""
        row0, col0, rows, cols = rect
        first = [r * self.columns + col0 for r in range(row0, row0 + rows)]
        return [(lo, lo + cols) for lo in first]

    def key_ranges(
        self, rect: tuple[int, int, int, int], first_level: int = 0
    ) -> list[tuple[int, int]]:
        """The half-open ranges of scan keys of ``rect``'s cells, levels ``first_level`` up."""
        return [
            (level * LEVEL_STRIDE + lo, level * LEVEL_STRIDE + hi)
            for level in range(first_level, len(self.levels) + 1)
            for lo, hi in self.cell_ranges(rect)
        ]

    def rect_of(self, w: float, s: float, e: float, n: float) -> tuple[int, int, int, int]:
        """The rectangle of cells covering a lon/lat box."""
        (r0, r1), (c0, c1) = self.rows_cols(np.array([w, e]), np.array([s, n]))
        return int(r0), int(c0), int(r1 - r0 + 1), int(c1 - c0 + 1)


@dataclass(frozen=True)
class ScanSettings:
    """What every scan task of a run shares."""

    work: str
    grid: Grid
    sources: tuple[ImageSource, ...]
    px: tuple[int, int, float]
    max_px: int
    tag_filter: str
    threads: int


@dataclass(frozen=True)
class ScanTask:
    """One read unit to scan (module-level data: picklable for a worker)."""

    name: str
    unit: ReadUnit
    settings: ScanSettings


def scan_path(work: str | Path, name: str, what: str = "scan") -> Path:
    """A scan task's output file: ``scan``, ``tags.parquet``, ``cells.parquet`` or
    ``relations.npy``."""
    return Path(work) / f"{name}.{what}"


def entry_gsd(objs: Objects, tag_filter: str) -> np.ndarray:
    """The coarsest GSD each tag entry is visible at (the object's max_gsd when unknown)."""
    from tag_filters import load_tag_filter

    tf = load_tag_filter(tag_filter)
    if len(objs.tag_keys) == 0:
        return np.zeros(0)
    names = pc.binary_join_element_wise(objs.tag_keys, objs.tag_values, "\x00")
    encoded = names.dictionary_encode()
    per_name = np.array(
        [
            np.nan if (g := tf.tag_max_gsd(*text.split("\x00", 1))) is None else g
            for text in encoded.dictionary.to_pylist()
        ],
        dtype=np.float64,
    )
    gsd = per_name[encoded.indices.to_numpy(zero_copy_only=False)]
    unknown = np.isnan(gsd)
    gsd[unknown] = objs.max_gsd[objs.entry_owner[unknown]]
    return gsd


@dataclass
class ScanStats(ShardRecord):
    """What one scan task found (kept in its marker)."""

    objects: int  # kept by the objects' reader
    candidates: int  # with a source
    dropped: dict[str, int]  # by the objects' reader, by reason
    skipped: dict[str, int]  # no source, by reason
    cpu: float
    already_done: bool = field(default=False, metadata={"saved": False})


def run_scan(task: ScanTask) -> ScanStats:
    """Scan one unit: decisions, cell keys, tag and cell counts (see the module doc)."""
    cpu0 = time.thread_time()
    settings = task.settings
    objs = read_unit(task.unit)
    gsd = entry_gsd(objs, settings.tag_filter)
    firsts = objs.tag_offsets[:-1]
    visible = np.maximum.reduceat(gsd, firsts) if len(objs) else np.zeros(0)
    objs.max_gsd = np.where(np.isfinite(objs.max_gsd), objs.max_gsd, visible)
    proj = ProjectedBounds(objs.bounds, settings.threads)
    choice = choose_sources(objs, settings.sources, proj, settings.px, settings.max_px)
    cell = settings.grid.cells(objs.bounds)
    key = settings.grid.level(visible) * LEVEL_STRIDE + cell
    order = np.lexsort((objs.element, objs.osm_id, objs.kind, key))
    _write_objects(task, objs, gsd, visible, choice, key, order)
    candidates = np.flatnonzero(choice.source >= 0)
    _write_tag_counts(task, objs, candidates)
    # Relation areas with a source, by (osm_id, source): a way area with the same key (a
    # closed way with the same number) gives way to them (their file names would collide).
    relation = candidates[(objs.kind[candidates] == 3) & (objs.element[candidates] == 3)]
    keys = np.sort(objs.osm_id[relation] * MAX_SOURCES + choice.source[relation])
    path = scan_path(settings.work, task.name, "relations.npy")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a path would get ".npy" appended
        np.save(f, keys, allow_pickle=False)
    cells, counts = np.unique(cell, return_counts=True)
    with atomic_path(scan_path(settings.work, task.name, "cells.parquet")) as tmp:
        pq.write_table(pa.table({"cell": cells, "objects": counts.astype(np.int64)}), tmp)
    return ScanStats(
        objects=len(objs),
        candidates=len(candidates),
        dropped=objs.dropped,
        skipped={k: v for k, v in choice.skipped.items() if v},
        cpu=round(time.thread_time() - cpu0, 4),
    )


def _write_objects(
    task: ScanTask,
    objs: Objects,
    gsd: np.ndarray,
    visible: np.ndarray,
    choice: Any,
    key: np.ndarray,
    order: np.ndarray,
) -> None:
    lengths = np.diff(objs.tag_offsets)[order]
    entries = ranges(objs.tag_offsets[order], lengths)
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = pa.array(entries, type=pa.int64())
    b = objs.bounds[order]
    columns = {
        "key": key[order],
        "kind": objs.kind[order],
        "element": objs.element[order],
        "osm_id": objs.osm_id[order],
        **{name: b[:, k] for k, name in enumerate(("west", "south", "east", "north"))},
        "max_gsd": objs.max_gsd[order],
        "visible": visible[order],
        "src": choice.source[order],
        "epsg": choice.epsg[order],
        "pixels": choice.pixels[order],
    }
    rows = Rows(
        columns, offsets, objs.tag_keys.take(take), objs.tag_values.take(take), gsd[entries]
    )
    write_scan_file(scan_path(task.settings.work, task.name), rows)


def _write_tag_counts(task: ScanTask, objs: Objects, candidates: np.ndarray) -> None:
    starts = objs.tag_offsets[candidates]
    entries = ranges(starts, objs.tag_offsets[candidates + 1] - starts)
    take = pa.array(entries, type=pa.int64())
    names = pc.binary_join_element_wise(objs.tag_keys.take(take), objs.tag_values.take(take), "=")
    counts = pc.value_counts(names)
    table = pa.table(
        {"tag": counts.field("values").cast(pa.string()), "count": counts.field("counts")}
    )
    with atomic_path(scan_path(task.settings.work, task.name, "tags.parquet")) as tmp:
        pq.write_table(table, tmp)


def sum_counts(paths: Sequence[Path], key: str, value: str, batch: int = 32) -> pa.Table:
    """``key``, summed ``value`` over parquet files, grouped a few files at a time (memory:
    the distinct keys, not the sum of the files' rows)."""
    total: pa.Table | None = None
    for i in range(0, len(paths), batch):
        tables = [pq.read_table(p) for p in paths[i : i + batch]]
        if total is not None:
            tables.append(total)
        merged = pa.concat_tables(tables).group_by(key).aggregate([(value, "sum")])
        total = merged.rename_columns(
            [value if c == f"{value}_sum" else c for c in merged.column_names]
        )
    assert total is not None, "sum_counts of no files"
    return total
