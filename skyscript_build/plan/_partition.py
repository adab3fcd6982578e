"""Pass 2 of the plan: one task per spatial partition, in memory set by the partition's size.

A partition is a rectangle of cells of the plan's grid (``_scan.Grid``): a block of
``shard_deg`` degrees, or a quarter of one (and so on) where a block holds more than
``partition_objects`` objects. Its task reads, memory-mapped from every scan file, the objects
whose box's centre lies in it; decides which of them become requests (the per-tag quotas from
the global counts, the same object kept once, the global ``max_requests`` cut); frames their
tiles; reads the halo (the objects of the cells around that may lie inside one of its tiles,
visible at the tile's GSD); finds every tile's surroundings and writes its parts
``part-PPPPP-KKK.parquet``. Every decision is the object's or the tile's own, so the rows do
not depend on the partitions nor on where the tasks run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from image_sources import ImageSource

from ..runner import ShardRecord
from ._choose import DUPLICATE, OVER_LIMIT, SAMPLED_OUT, frame, limit_numbers, sample_by_tag
from ._geo import ProjectedBounds, distinct, object_hash
from ._objects import Objects
from ._output import build_table, write_parts
from ._scan import CELLS_PER_BLOCK, MAX_SOURCES, Grid, sum_counts
from ._scanfile import Rows, ScanFile, concat_rows, empty_rows, take_rows
from ._surround import surroundings

#: Pad of a halo box, as a fraction of its extent (plus an absolute 1e-6 degrees): a tile's
#: lon/lat box is its projected square's, whose edges may bow slightly outwards.
HALO_PAD = 1e-3
#: Bins of the histogram that finds the ``max_requests`` cut.
LIMIT_BINS = 1 << 16

Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class PartitionSettings:
    """What every partition task of a run shares."""

    out: str
    grid: Grid
    scans: tuple[str, ...]
    sources: tuple[ImageSource, ...]
    source_years: tuple[tuple[int, ...], ...]
    seed: int
    shift: float
    per_tag_cap: int | None
    tag_counts: str | None
    relation_keys: str | None
    max_surrounding: int
    rows_per_part: int
    threads: int


@dataclass(frozen=True)
class PartitionTask:
    """One partition (picklable for a worker).

    ``mode``: ``write`` (the whole pass), ``decide`` (only count what would be requested:
    the dry run), ``histogram`` or ``values`` (the ``max_requests`` cut's two rounds).
    """

    name: str
    number: int
    rect: Rect
    settings: PartitionSettings
    limit_cut: float | None = None
    mode: str = "write"
    limit_bin: int = -1


# --- the partitions ---------------------------------------------------------------------------


def plan_partitions(grid: Grid, cell_files: Sequence[Path], target: int) -> list[Rect]:
    """Rectangles of cells holding every object, in (row, column) order of blocks: a run of
    blocks of one block row holding ``target`` objects at most together (sparse land: few
    tasks, each reading a few ranges of every scan file), a block, or, where one block holds
    more than ``target``, its quarters (recursively, down to one cell; south-west, south-east,
    north-west, north-east)."""
    cols = grid.columns
    block_cols = -(-cols // CELLS_PER_BLOCK)

    def block_keys(table: pa.Table) -> pa.Table:
        cell = table["cell"].to_numpy()
        row, col = cell // cols, cell % cols
        block = (row // CELLS_PER_BLOCK) * block_cols + col // CELLS_PER_BLOCK
        return pa.table({"block": block, "objects": table["objects"]})

    blocks = _sum_tables((block_keys(pq.read_table(p)) for p in cell_files), "block", "objects")
    block_ids = blocks["block"].to_numpy()
    block_n = blocks["objects"].to_numpy()
    order = np.argsort(block_ids)
    block_ids, block_n = block_ids[order], block_n[order]
    dense = set(block_ids[block_n > target].tolist())
    fine: dict[int, int] = {}
    if dense:
        cells = sum_counts(list(cell_files), "cell", "objects")
        cell = cells["cell"].to_numpy()
        row, col = cell // cols, cell % cols
        block = (row // CELLS_PER_BLOCK) * block_cols + col // CELLS_PER_BLOCK
        keep = np.isin(block, np.array(sorted(dense), dtype=np.int64))
        fine = dict(
            zip(cell[keep].tolist(), cells["objects"].to_numpy()[keep].tolist(), strict=True)
        )
    rects: list[Rect] = []
    run: list[int] = []  # consecutive blocks of one block row, sparse together
    run_n = 0

    def flush() -> None:
        nonlocal run, run_n
        if run:
            first, last = run[0], run[-1]
            rects.append((
                (first // block_cols) * CELLS_PER_BLOCK, (first % block_cols) * CELLS_PER_BLOCK,
                CELLS_PER_BLOCK, (last - first + 1) * CELLS_PER_BLOCK,
            ))  # fmt: skip
        run, run_n = [], 0

    for b, n in zip(block_ids.tolist(), block_n.tolist(), strict=True):
        if b in dense:
            flush()
            rect = ((b // block_cols) * CELLS_PER_BLOCK, (b % block_cols) * CELLS_PER_BLOCK,
                    CELLS_PER_BLOCK, CELLS_PER_BLOCK)  # fmt: skip
            _split(rect, grid, fine, target, rects)
            continue
        if run and (b // block_cols != run[0] // block_cols or run_n + n > target):
            flush()
        run.append(b)
        run_n += n
    flush()
    return rects


def _split(rect: Rect, grid: Grid, fine: dict[int, int], target: int, out: list[Rect]) -> None:
    row0, col0, rows, cols = rect
    n = sum(fine.get(k, 0) for lo, hi in grid.cell_ranges(rect) for k in range(lo, hi))
    if n == 0:
        return
    if n <= target or rows == 1:
        out.append(rect)
        return
    half = rows // 2
    for r, c in (
        (row0, col0),
        (row0, col0 + half),
        (row0 + half, col0),
        (row0 + half, col0 + half),
    ):
        _split((r, c, half, half), grid, fine, target, out)


def _sum_tables(tables: Any, key: str, value: str, batch: int = 32) -> pa.Table:
    total: pa.Table | None = None
    pending: list[pa.Table] = []
    for table in tables:
        pending.append(table)
        if len(pending) >= batch:
            total = _merge([*pending, *([total] if total is not None else [])], key, value)
            pending = []
    if pending or total is None:
        total = _merge([*pending, *([total] if total is not None else [])], key, value)
    return total


def _merge(tables: list[pa.Table], key: str, value: str) -> pa.Table:
    if not tables:
        return pa.table({key: pa.array([], pa.int64()), value: pa.array([], pa.int64())})
    merged = pa.concat_tables(tables).group_by(key).aggregate([(value, "sum")])
    return merged.rename_columns([value if c == f"{value}_sum" else c for c in merged.column_names])


# --- reading the scan files -------------------------------------------------------------------


class ScanReader:
    """The scan files of a run: rows by key ranges, read with positioned reads."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.files = [ScanFile(p) for p in paths]

    def close(self) -> None:
        for f in self.files:
            f.close()

    def rows(
        self,
        key_ranges: Sequence[tuple[int, int]],
        where: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    ) -> Rows:
        """The rows whose scan key is in one of the half-open ranges and, with ``where``, that
        pass it (``where(columns)`` gives a mask; applied range by range, so that memory
        holds only the rows kept)."""
        pieces = []
        for f in self.files:
            for lo, hi in key_ranges:
                a, b = f.find(lo, hi)
                if b <= a:
                    continue
                rows = f.rows_between(a, b)
                if where is not None:
                    keep = np.flatnonzero(where(rows.columns))
                    if len(keep) < len(rows):
                        rows = take_rows(rows, keep)
                if len(rows):
                    pieces.append(rows)
        return concat_rows(pieces) if pieces else empty_rows()


@dataclass
class Members:
    """A partition's objects and its halo's, in object order (kind, osm_id, element)."""

    objs: Objects
    visible: np.ndarray
    entry_gsd: np.ndarray
    src: np.ndarray
    epsg: np.ndarray
    pixels: np.ndarray
    inside: np.ndarray  # in the partition (not halo)


def _members(pieces: list[tuple[Rows, bool]]) -> Members:
    rows = concat_rows([r for r, _ in pieces])
    inside = np.concatenate([np.full(len(r), own) for r, own in pieces])
    c = rows.columns
    order = np.lexsort((c["element"], c["osm_id"], c["kind"]))
    rows = take_rows(rows, order)
    c = rows.columns
    objs = Objects(
        kind=c["kind"],
        element=c["element"],
        osm_id=c["osm_id"],
        bounds=np.column_stack([c["west"], c["south"], c["east"], c["north"]]),
        max_gsd=c["max_gsd"],
        tag_offsets=rows.tag_offsets,
        tag_keys=rows.tag_keys,
        tag_values=rows.tag_values,
        dropped={},
    )
    return Members(
        objs=objs,
        visible=c["visible"],
        entry_gsd=rows.tag_gsd,
        src=c["src"].astype(np.int64),
        epsg=c["epsg"].astype(np.int64),
        pixels=c["pixels"].astype(np.int64),
        inside=inside[order],
    )


# --- the task ---------------------------------------------------------------------------------


def _tag_counts(path: str | None) -> dict[str, int]:
    if path is None:
        return {}
    table = pq.read_table(path)
    return dict(zip(table["tag"].to_pylist(), table["count"].to_pylist(), strict=True))


def _decide(m: Members, task: PartitionTask) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The requests among the partition's objects (member indices, in object order), their
    objects' hashes and the skips by reason."""
    s = task.settings
    objs = m.objs
    h = object_hash(s.seed, objs.kind, objs.element, objs.osm_id)
    idx = np.flatnonzero(m.inside & (m.src >= 0))
    skipped: dict[str, int] = {}
    if s.relation_keys is not None and len(idx):
        keep = ~_named_like_a_relation(objs, m.src, idx, s.relation_keys)
        skipped[DUPLICATE] = int((~keep).sum())
        idx = idx[keep]
    if s.per_tag_cap is not None and len(idx):
        keep = sample_by_tag(objs, idx, h, _tag_counts(s.tag_counts), s.per_tag_cap)
        skipped[SAMPLED_OUT] = int((~keep).sum())
        idx = idx[keep]
    if len(idx) > 1:
        src = m.src[idx]
        dup = np.r_[
            False,
            (objs.kind[idx[1:]] == objs.kind[idx[:-1]])
            & (objs.osm_id[idx[1:]] == objs.osm_id[idx[:-1]])
            & (src[1:] == src[:-1]),
        ]
        skipped[DUPLICATE] = skipped.get(DUPLICATE, 0) + int(dup.sum())
        idx = idx[~dup]
    if task.limit_cut is not None and task.mode in ("write", "decide"):
        keep = limit_numbers(h[idx]) < task.limit_cut
        skipped[OVER_LIMIT] = int((~keep).sum())
        idx = idx[keep]
    return idx, h, {k: v for k, v in skipped.items() if v}


def _named_like_a_relation(
    objs: Objects, src: np.ndarray, idx: np.ndarray, path: str
) -> np.ndarray:
    """Mask over ``idx``: way areas whose key (``a<osm_id>_<source>_<yy>``) a relation area of
    the plan has too (read memory-mapped: sorted ``osm_id * MAX_SOURCES + source``)."""
    way_area = (objs.kind[idx] == 3) & (objs.element[idx] == 2)
    out = np.zeros(len(idx), dtype=bool)
    relations = np.load(path, mmap_mode="r")
    if not way_area.any() or len(relations) == 0:
        return out
    keys = objs.osm_id[idx[way_area]] * MAX_SOURCES + src[idx[way_area]]
    pos = np.minimum(np.searchsorted(relations, keys), len(relations) - 1)
    out[way_area] = relations[pos] == keys
    return out


def _by_source(
    m: Members, idx: np.ndarray, sources: Sequence[ImageSource]
) -> dict[str, dict[str, float]]:
    out = {}
    src = m.src[idx]
    for k, source in enumerate(sources):
        mine = src == k
        if mine.any():
            out[source.alias] = {
                "requests": int(mine.sum()),
                "megapixels": float((m.pixels[idx][mine].astype(np.float64) ** 2).sum()) / 1e6,
            }
    return out


@dataclass
class PartitionStats(ShardRecord):
    """What one partition task decided and wrote (kept in its marker)."""

    partition: int
    requests: int
    by_source: dict[str, dict[str, float]]  # alias -> requests, megapixels
    skipped: dict[str, int]  # by reason
    parts: list[str] = field(default_factory=list)
    surrounding: int = 0  # (request, surrounding object) pairs
    halo: int = 0  # objects read from the cells around
    cpu_frame: float = 0.0
    cpu_surround: float = 0.0
    cpu_write: float = 0.0
    already_done: bool = field(default=False, metadata={"saved": False})


@dataclass
class LimitNumbers:
    """A partition's share of the ``max_requests`` cut: a histogram of its requests' ranking
    numbers (``bins``, ``counts``), or their values in one bin (``values``)."""

    bins: np.ndarray | None = None
    counts: np.ndarray | None = None
    values: np.ndarray | None = None


def _decided(task: PartitionTask) -> tuple[ScanReader, Rows, Members, np.ndarray, np.ndarray, dict]:
    """The partition's objects read (the reader left open), and its decisions (``_decide``)."""
    reader = ScanReader(task.settings.scans)
    try:
        own = reader.rows(task.settings.grid.key_ranges(task.rect))
        m = _members([(own, True)])
        return (reader, own, m, *_decide(m, task))
    except BaseException:
        reader.close()
        raise


def partition_limit_numbers(task: PartitionTask) -> LimitNumbers:
    """The ``max_requests`` rounds (``task.mode`` ``histogram`` or ``values``): a histogram of
    the ranking numbers of the partition's requests, or their values in ``task.limit_bin``."""
    reader, _, _, idx, h, _ = _decided(task)
    reader.close()
    r = limit_numbers(h[idx])
    bins = np.minimum((r * LIMIT_BINS).astype(np.int64), LIMIT_BINS - 1)
    if task.mode == "values":
        return LimitNumbers(values=np.sort(r[bins == task.limit_bin]))
    used, counts = np.unique(bins, return_counts=True)
    return LimitNumbers(bins=used, counts=counts)


def run_partition(task: PartitionTask) -> PartitionStats:
    """One partition: decide, frame, find surroundings, write its parts; its counts (only the
    decisions' in the ``decide`` mode, the dry run's)."""
    cpu0 = time.thread_time()
    s = task.settings
    reader, own, m, idx, h, skipped = _decided(task)
    try:
        stats = PartitionStats(task.number, len(idx), _by_source(m, idx, s.sources), skipped)
        if task.mode == "decide":
            return stats
        src, epsg, pixels = m.src[idx], m.epsg[idx], m.pixels[idx]
        gsd = np.array([x.gsd for x in s.sources], dtype=np.float64)[src]
        frames = frame(m.objs, idx, epsg, gsd, pixels, ProjectedBounds(m.objs.bounds), h, s.shift)
        if len(idx) and s.max_surrounding > 0:
            m, idx = _with_halo(m, idx, own, reader, task, gsd, frames.lonlat)
            h = object_hash(s.seed, m.objs.kind, m.objs.element, m.objs.osm_id)
        del own
    finally:
        reader.close()
    cpu1 = time.thread_time()
    pair_req, pair_obj = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if s.max_surrounding > 0 and len(idx):
        proj = ProjectedBounds(m.objs.bounds, s.threads)
        pair_req, pair_obj = surroundings(
            m.objs, m.visible, idx, epsg, gsd, frames.xy, frames.lonlat, proj, h,
            s.max_surrounding, s.threads,
        )  # fmt: skip
        del proj
    cpu2 = time.thread_time()

    def build(start: int, stop: int) -> pa.Table:
        lo, hi = np.searchsorted(pair_req, [start, stop])
        part = slice(start, stop)
        return build_table(
            m.objs, s.sources, s.source_years, idx[part], src[part], epsg[part],
            frames.xy[part], frames.lonlat[part], pixels[part], m.entry_gsd,
            pair_req[lo:hi] - start, pair_obj[lo:hi],
        )  # fmt: skip

    if len(idx):
        stem = f"part-{task.number:05d}"
        parts = write_parts(build, len(idx), Path(s.out), s.rows_per_part, s.threads, stem)
        stats.parts = [p.name for p in parts]
    pa.default_memory_pool().release_unused()  # arrow's allocator keeps freed pages else
    stats.surrounding, stats.halo = int(len(pair_req)), int((~m.inside).sum())
    stats.cpu_frame, stats.cpu_surround = round(cpu1 - cpu0, 4), round(cpu2 - cpu1, 4)
    stats.cpu_write = round(time.thread_time() - cpu2, 4)
    return stats


def _with_halo(
    m: Members, idx: np.ndarray, own: Rows, reader: ScanReader, task: PartitionTask,
    gsd: np.ndarray, lonlat: np.ndarray,
) -> tuple[Members, np.ndarray]:  # fmt: skip
    """The members with the halo added (the objects of the cells around the partition that
    lie inside the padded box of its tiles of some GSD and are visible at that GSD), and the
    requests' indices among them."""
    grid = task.settings.grid
    boxes = []
    for g in distinct(gsd).tolist():
        box = lonlat[gsd == g]
        w, s = float(box[:, 0].min()), float(box[:, 1].min())
        e, n = float(box[:, 2].max()), float(box[:, 3].max())
        pad_x, pad_y = (e - w) * HALO_PAD + 1e-6, (n - s) * HALO_PAD + 1e-6
        boxes.append((g, w - pad_x, s - pad_y, e + pad_x, n + pad_y))

    def near(c: dict[str, np.ndarray]) -> np.ndarray:
        vis = c["visible"]
        w, s, e, n = c["west"], c["south"], c["east"], c["north"]
        keep = np.zeros(len(vis), dtype=bool)
        for g, bw, bs, be, bn in boxes:
            keep |= (vis >= g * (1 - 1e-9)) & (w >= bw) & (s >= bs) & (e <= be) & (n <= bn)
        return keep

    # Per GSD its own ring of cells and levels: a coarse GSD's tiles reach far, but few
    # objects show at it.
    ring = sorted(
        {
            r
            for g, *box in boxes
            for r in _minus(
                grid.key_ranges(grid.rect_of(*box), grid.first_level(g)),
                grid.key_ranges(task.rect),
            )
        }
    )
    halo = reader.rows(_disjoint(ring), near) if ring else empty_rows()
    if len(halo) == 0:
        return m, idx
    merged = _members([(own, True), (halo, False)])
    # The partition's own objects keep their order among themselves (a stable sort of the
    # same keys), so its k-th object is the k-th inside one.
    return merged, np.flatnonzero(merged.inside)[idx]


def _disjoint(sorted_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted half-open ranges merged where they overlap or touch."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted_ranges:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _minus(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of half-open key ranges outside the ``cut`` ranges (both sorted, disjoint)."""
    out = []
    for lo, hi in ranges:
        start = lo
        for clo, chi in cut:
            if chi <= start or clo >= hi:
                continue
            if clo > start:
                out.append((start, clo))
            start = max(start, chi)
        if start < hi:
            out.append((start, hi))
    return out
