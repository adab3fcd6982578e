"""The first pass over an input, split into tasks by ranges of its blobs (``NodeTask``).

A node task decodes each of its blobs once:

- tagged nodes become points (``part-0-TTTTT-*``), decoded in bulk from the DenseNodes groups
  (``_dense``), and every node location goes into the task's node store (``_nodestore``);
- a blob with ways is listed for the way tasks, which run once every node store is written;
- the relations osmium would assemble into kept areas are listed with their member ways
  (``_areas.relation_candidates``), for the way tasks (which keep those ways with their
  locations) and the relation tasks, with a histogram by id that the relation tasks are cut
  by.

A blob the bulk decoder does not cover (plain nodes, another compression) goes through
pyosmium, with the same rows.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import osmium
import pyarrow as pa

from tag_filters import TagFilter, load_tag_filter

from ._areas import add_row, prescan_relations, relation_candidates, tag_picker
from ._dense import LIMIT_X, LIMIT_Y, PointBlock, TagJudge, dense_points
from ._encode import pbf_file
from ._nodestore import save_array, write_npz, write_store
from ._parquet import Batch, PartWriter, batch_to_table, columns_to_table, point_wkb, remove_parts
from ._pbf import (
    DENSE_NODES,
    NODES,
    RELATIONS,
    WAYS,
    StringTable,
    Unsupported,
    data_block_parts,
    decompress,
    dense_nodes,
    group_kind,
    read_blob,
)
from ._records import NodeStats

__all__ = ["NodeTask", "node_task"]

#: The finest cut of the relations into relation tasks: this many relations and member ways.
HIST_STEP = 250


@dataclass(frozen=True)
class NodeTask:
    """Blobs ``blobs`` ((offset, size) each) of an input: picklable for a worker."""

    name: str
    input: str
    index: int
    blobs: tuple[tuple[int, int], ...]
    out_dir: str
    work_dir: str
    tag_filter: str
    rows_per_part: int
    batch_rows: int


class _Blob:
    """What one blob gave, kept apart until the whole blob is decoded."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.points: list[PointBlock | pa.Table] = []
        self.ways = self.relations = False
        self.invalid = 0
        self.candidates: list[tuple[np.ndarray, ...]] = []  # relations decoded in bulk
        empty = np.zeros(0, np.int64)
        self.relation_list: tuple[np.ndarray, ...] = (empty, empty, empty)  # all of the blob


def _bulk(block: bytes, judge: TagJudge) -> _Blob:
    """Decode a blob in bulk: its nodes, and the relations to assemble; note whether it
    holds ways. Raises ``Unsupported``."""
    got = _Blob()
    strings, meta, groups = data_block_parts(block)
    table: StringTable | None = None
    for group in groups:
        kind, value = group_kind(block, group)
        if kind == NODES:
            raise Unsupported("plain (not dense) nodes")
        got.ways |= kind == WAYS
        if kind in (DENSE_NODES, RELATIONS) and table is None:
            table = StringTable.of_block(block, strings)
        if kind == RELATIONS:
            assert table is not None
            got.relations = True
            got.candidates.append(relation_candidates(judge, block, group, table))
        if kind != DENSE_NODES:
            continue
        assert isinstance(value, tuple) and table is not None
        nodes = dense_nodes(block, value, meta)
        if nodes is None:
            continue
        valid = (np.abs(nodes.x) <= LIMIT_X) & (np.abs(nodes.y) <= LIMIT_Y)
        got.ids.append(nodes.ids[valid])
        got.xs.append(nodes.x[valid].astype(np.int32))
        got.ys.append(nodes.y[valid].astype(np.int32))
        points = dense_points(block, nodes, table, judge)
        if points is not None:
            got.invalid += points.invalid
            if len(points):
                got.points.append(points)
    return got


def _with_osmium(raw: bytes, tf: TagFilter, dropped: Counter) -> _Blob:
    """Decode a blob through pyosmium (any PBF osmium reads): the same points as ``_bulk``."""
    got = _Blob()
    pick = tag_picker(tf)
    ids: list[int] = []
    xs: list[int] = []
    ys: list[int] = []
    batch = Batch("n")
    obj: Any
    for obj in osmium.FileProcessor(osmium.io.FileBuffer(pbf_file(blobs=[raw]), "pbf")):
        if obj.is_way():
            got.ways = True
        elif obj.is_relation():
            got.relations = True
        elif obj.is_node():
            loc = obj.location
            if loc.valid():
                ids.append(obj.id)
                xs.append(loc.x)
                ys.append(loc.y)
            picked = pick(obj)
            if picked is None:
                continue
            if not loc.valid():
                got.invalid += 1
                continue
            add_row(batch, "node", obj.id, picked)
            batch.lons.append(loc.lon)
            batch.lats.append(loc.lat)
    got.ids.append(np.array(ids, np.int64))
    got.xs.append(np.array(xs, np.int32))
    got.ys.append(np.array(ys, np.int32))
    if len(batch):
        got.points.append(batch_to_table(batch, dropped))
    return got


def _read(
    f: BinaryIO, offset: int, size: int, tf: TagFilter, judge: TagJudge, dropped: Counter
) -> _Blob:
    """Decode one blob, in bulk or else through pyosmium; raises on a corrupt blob."""
    raw = read_blob(f, offset, size)
    try:
        got = _bulk(decompress(raw), judge)
    except Unsupported:
        got = _with_osmium(raw, tf, dropped)
    if got.candidates:
        got.relation_list = tuple(np.concatenate(a) for a in zip(*got.candidates, strict=True))
    elif got.relations:  # decoded by pyosmium
        got.relation_list = prescan_relations(tf, [raw])
    return got


def _points_table(blocks: list[PointBlock]) -> pa.Table:
    offsets = [np.zeros(1, np.int32)]
    base = 0
    for b in blocks:
        offsets.append(b.offsets[1:] + base)
        base += int(b.offsets[-1])
    n = sum(len(b) for b in blocks)
    lons = np.concatenate([b.lons for b in blocks])
    lats = np.concatenate([b.lats for b in blocks])
    return columns_to_table(
        "n",
        pa.array(np.full(n, "node", dtype=object), pa.string()),
        np.concatenate([b.ids for b in blocks]),
        np.concatenate(offsets),
        pa.concat_arrays([b.keys for b in blocks]),
        pa.concat_arrays([b.values for b in blocks]),
        np.concatenate([b.max_gsd for b in blocks]),
        point_wkb(lons, lats),
        np.stack([lons, lats, lons, lats], axis=1),
    )


class _Points:
    """Point blocks (or tables from pyosmium) written as tables of about ``batch_rows`` rows."""

    def __init__(self, writer: PartWriter, batch_rows: int) -> None:
        self.writer, self.batch_rows = writer, batch_rows
        self.pending: list[PointBlock] = []
        self.rows = 0

    def add(self, item: PointBlock | pa.Table) -> None:
        if isinstance(item, pa.Table):
            self.flush()
            self.writer.write(item)
            return
        self.pending.append(item)
        self.rows += len(item)
        if self.rows >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write(_points_table(self.pending))
            self.pending, self.rows = [], 0


def _histogram(ids: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    """Cut points of the candidate relations (in file order) into pieces of about
    ``HIST_STEP`` work (a relation and each member way count 1): [last id, work] each."""
    if ids.size == 0:
        return []
    work = np.cumsum(counts + 1)
    ends = np.flatnonzero(np.diff(work // HIST_STEP, append=-1) != 0)
    ends[-1] = ids.size - 1
    done = np.concatenate(([0], work[ends][:-1]))
    return [[int(ids[e]), int(w - d)] for e, w, d in zip(ends, work[ends], done, strict=True)]


@dataclass
class _Found:
    """What a node task's blobs hold besides points: node locations, the blobs with ways and
    relations, the candidate relations with their member ways."""

    ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    xs: list[np.ndarray] = dataclasses.field(default_factory=list)
    ys: list[np.ndarray] = dataclasses.field(default_factory=list)
    way_blobs: list[list[int]] = dataclasses.field(default_factory=list)  # [offset, size]
    relation_blobs: list[list[int]] = dataclasses.field(default_factory=list)  # + first and last id
    relation_ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    member_counts: list[np.ndarray] = dataclasses.field(default_factory=list)
    members: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, got: _Blob, offset: int, size: int) -> None:
        self.ids += got.ids
        self.xs += got.xs
        self.ys += got.ys
        if got.ways:
            self.way_blobs.append([offset, size])
        rid, count, member = got.relation_list
        if rid.size:
            self.relation_blobs.append([offset, size, int(rid.min()), int(rid.max())])
            self.relation_ids.append(rid)
            self.member_counts.append(count)
            self.members.append(member)

    def locations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids, x and y of the located nodes, in file order."""
        if not self.ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(self.ids), np.concatenate(self.xs), np.concatenate(self.ys)


def node_task(task: NodeTask) -> NodeStats:
    """Run one node task (see the module); what it found, or ``error``."""
    tf = load_tag_filter(task.tag_filter)
    judge = TagJudge(tf)
    out, work = Path(task.out_dir), Path(task.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = f"0-{task.index:05d}"
    remove_parts(out, prefix)
    writer = PartWriter(out, prefix, task.rows_per_part)
    points = _Points(writer, task.batch_rows)
    dropped: Counter = Counter()
    found = _Found()
    with open(task.input, "rb") as f:
        for offset, size in task.blobs:
            try:
                got = _read(f, offset, size, tf, judge, dropped)
            except (zlib.error, IndexError, ValueError, RuntimeError, OSError) as e:
                writer.abort()
                return NodeStats(error=f"corrupt OSM PBF block at byte {offset} ({e})")
            for item in got.points:
                points.add(item)
            dropped["invalid_location"] += got.invalid
            found.add(got, offset, size)
    points.flush()
    store = write_store(work, f"nodes-{task.index:05d}", *found.locations())
    stats = NodeStats(
        rows={"n": writer.rows},
        parts=writer.close(),
        dropped=dict(sorted((+dropped).items())),
        store=store,
        way_blobs=found.way_blobs,
        relation_blobs=found.relation_blobs,
    )
    if found.relation_ids:
        _write_relations(work / f"relations-{task.index:05d}", found, stats)
    return stats


def _write_relations(stem: Path, found: _Found, stats: NodeStats) -> None:
    """The task's candidate relations (``STEM.npz``) and their member ways' ids
    (``STEM.members.npy``) written for the relation tasks; where they are, and a histogram of
    the relations' work by id, into ``stats``."""
    rid, count, member = (
        np.concatenate(a) for a in (found.relation_ids, found.member_counts, found.members)
    )
    stats.relations = {
        "path": write_npz(stem.with_suffix(".npz"), ids=rid, counts=count, members=member),
        "min": int(rid.min()),
        "max": int(rid.max()),
        "count": int(rid.size),
    }
    stats.hist = _histogram(rid, count)
    unique = np.unique(member)
    if unique.size:
        stats.members = {
            "path": save_array(stem.with_suffix(".members.npy"), unique),
            "min": int(unique[0]),
            "max": int(unique[-1]),
        }
