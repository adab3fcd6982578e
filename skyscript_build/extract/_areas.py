"""Areas assembled by osmium from small in-memory PBF files whose ways carry their node
locations (``_encode``), so that no osmium node index is needed.

- Areas from closed ways: a way task writes its candidate ways (groundable, closed, an area by
  their tags; see ``_rules``) with their locations and has osmium assemble them here; their
  tags come from the way task's own decoding.
- Areas from multipolygon relations: the node tasks list each candidate relation and its
  member ways (``relation_candidates``, in bulk; ``prescan_relations`` through pyosmium); the
  way tasks keep those member ways with their locations on disk; a relation task assembles the
  relations of one id range from the raw relation blobs and those ways (``relation_task``).

Geometries come from osmium's WKB factory and are checked and repaired with shapely
(``_parquet.area_geometries``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import osmium
import osmium.area
import osmium.filter
import osmium.geom
import pyarrow.compute as pc

from tag_filters import TagFilter, load_tag_filter

from ._dense import TagJudge, judge_tags
from ._encode import pbf_file, ranges, way_blocks
from ._parquet import Batch, PartWriter, batch_to_table, remove_parts
from ._pbf import Elements, StringTable, Unsupported, read_blob
from ._records import RelationStats

__all__ = [
    "Picked",
    "tag_picker",
    "add_row",
    "key_filter",
    "assemble_way_areas",
    "prescan_relations",
    "relation_candidates",
    "MemberSet",
    "RelationTask",
    "relation_task",
]

Picked = tuple[list[str], list[str], float]
#: The relation types osmium assembles into areas.
AREA_RELATION_TYPES = ("multipolygon", "boundary")


def tag_picker(tf: TagFilter) -> Callable[..., Picked | None]:
    """A fast function: an osmium object -> (keys, values, max_gsd) of its groundable tags.

    It walks the tags through the C++ accessors (pyosmium's ``TagList`` iterator costs a Python
    frame per tag) and looks up only keys that can be groundable.
    """
    rule = tf.rule
    candidates = tf.candidate_keys()

    def pick(obj: Any) -> Picked | None:
        data = obj._pyosmium_data
        nxt = data.tags_next
        it = data.tags_begin()
        keys: list[str] = []
        values: list[str] = []
        best = -1.0
        for _ in range(data.tags_size()):
            k, v = nxt(it)
            if candidates is not None and k not in candidates:
                continue
            r = rule(k, v)
            if r is not None and r.groundable:
                keys.append(k)
                values.append(v)
                if r.max_gsd is not None and r.max_gsd > best:
                    best = r.max_gsd
        if not keys:
            return None
        return keys, values, best

    return pick


def add_row(batch: Batch, element: str, oid: int, picked: Picked) -> None:
    """Append one object's element, id and groundable tags to ``batch``."""
    keys, values, best = picked
    batch.osm_element.append(element)
    batch.ids.append(oid)
    batch.tag_keys.extend(keys)  # in the element's own order (OSM's)
    batch.tag_values.extend(values)
    batch.tag_offsets.append(len(batch.tag_keys))
    batch.max_gsd.append(best)


def key_filter(tf: TagFilter) -> Any:
    """osmium's C++ filter letting through only objects with a candidate key."""
    keys = tf.candidate_keys()
    return osmium.filter.KeyFilter(*sorted(keys)) if keys else osmium.filter.EmptyTagFilter()


class _WayAreas:
    """Receives the areas osmium assembles from closed ways: their ids and WKB (hex)."""

    def __init__(self) -> None:
        self.wkb = osmium.geom.WKBFactory()
        self.ids: list[int] = []
        self.geoms: list[str] = []

    def area(self, a: Any) -> None:
        try:
            geom = self.wkb.create_multipolygon(a)
        except (osmium.InvalidLocationError, RuntimeError):
            return  # counted as broken by the caller (candidates - areas)
        self.ids.append(a.orig_id())
        self.geoms.append(geom)


def assemble_way_areas(blocks: list[bytes]) -> tuple[np.ndarray, list[str]]:
    """(way ids, WKB hex) of the areas osmium assembles from closed ways (PrimitiveBlocks of
    ``_encode``), in the order of the ways."""
    handler = _WayAreas()
    manager = osmium.area.AreaManager()
    with osmium.io.Reader(osmium.io.FileBuffer(pbf_file(blocks), "pbf"), osmium.osm.WAY) as r:
        osmium.apply(r, manager.second_pass_handler(handler))
    return np.array(handler.ids, np.int64), handler.geoms


class _RelationAreas:
    """Receives the areas osmium assembles from relations and gathers the groundable ones."""

    def __init__(self, tf: TagFilter, dropped: Counter) -> None:
        self.pick = tag_picker(tf)
        self.wkb = osmium.geom.WKBFactory()
        self.dropped = dropped
        self.batch = Batch("a")

    def area(self, a: Any) -> None:
        if a.from_way():
            return  # a closed member way: its own area comes from the way tasks
        picked = self.pick(a)
        if picked is None:
            return
        try:
            geom = self.wkb.create_multipolygon(a)
        except (osmium.InvalidLocationError, RuntimeError):
            self.dropped["broken_multipolygon"] += 1
            return
        add_row(self.batch, "relation", a.orig_id(), picked)
        self.batch.geoms.append(geom)


# --- relations: the pre-scan (node tasks) -------------------------------------------------


class _RelationLister:
    """Lists the relations osmium would assemble into kept areas, with their member ways."""

    def __init__(self, tf: TagFilter) -> None:
        self.pick = tag_picker(tf)
        self.ids: list[int] = []
        self.counts: list[int] = []
        self.members: list[int] = []

    def relation(self, r: Any) -> None:
        if r.tags.get("type") not in AREA_RELATION_TYPES or self.pick(r) is None:
            return
        ways = [m.ref for m in r.members if m.type == "w"]
        self.ids.append(r.id)
        self.counts.append(len(ways))
        self.members.extend(ways)


def relation_candidates(
    judge: TagJudge, block: bytes, group: tuple[int, int], table: StringTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, member way counts, member way ids) of the relations of a group that osmium would
    assemble into kept areas (type multipolygon or boundary, a groundable tag), decoded in
    bulk (``_ways.Elements``); the same as ``prescan_relations``."""
    rel = Elements(block, group, 0x22)
    n = len(rel)
    kidx, vidx, kcount = rel.tags()
    owner = np.repeat(np.arange(n), kcount)
    judged = judge_tags(judge, table, kidx, vidx)
    kept = np.zeros(n, bool)
    if judged is not None:
        kept[owner[judged[0]]] = True
    type_keys = [k for k in np.unique(kidx).tolist() if table[k] == "type"]
    typed = np.flatnonzero(np.isin(kidx, type_keys))
    area = np.array([table[v] in AREA_RELATION_TYPES for v in vidx[typed].tolist()], bool)
    kept &= np.bincount(owner[typed[area]], minlength=n) > 0
    members, count = rel.deltas(9)
    types, type_count = rel.packed(10)
    if not np.array_equal(count, type_count):
        raise Unsupported("a relation with member ids and types of different counts")
    member_of = np.repeat(np.arange(n), count)
    ways = kept[member_of] & (types == 1)
    return rel.ids[kept], np.bincount(member_of[ways], minlength=n)[kept], members[ways]


def prescan_relations(tf: TagFilter, blobs: list[bytes]) -> tuple[np.ndarray, ...]:
    """(ids, member counts, member way ids) of the area relations in raw Blob messages,
    through pyosmium."""
    lister = _RelationLister(tf)
    buffer = osmium.io.FileBuffer(pbf_file(blobs=blobs), "pbf")
    area_types = osmium.filter.TagFilter(*(("type", t) for t in AREA_RELATION_TYPES))
    with osmium.io.Reader(buffer, osmium.osm.RELATION) as r:
        osmium.apply(r, area_types, key_filter(tf), lister)  # in C++ before any Python
    return (
        np.array(lister.ids, np.int64),
        np.array(lister.counts, np.int64),
        np.array(lister.members, np.int64),
    )


class MemberSet:
    """The member ways of every candidate relation of an input, as sorted id files (one per
    node task), for membership tests by way tasks."""

    def __init__(self, files: list[dict[str, Any]]) -> None:
        self.files = files
        self.low = np.array([f["min"] for f in files], np.int64)
        self.high = np.array([f["max"] for f in files], np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """A mask: which of ``ids`` are members."""
        hit = np.zeros(ids.size, bool)
        if ids.size == 0 or not self.files:
            return hit
        lo, hi = ids.min(), ids.max()
        for i in np.flatnonzero((self.low <= hi) & (self.high >= lo)).tolist():
            members = np.load(self.files[i]["path"], mmap_mode="r")  # sorted
            a, b = np.searchsorted(members, [lo, hi + 1])
            hit |= np.isin(ids, np.asarray(members[a:b]))
            del members
        return hit


# --- relations: assembly (relation tasks) -------------------------------------------------


@dataclass(frozen=True)
class RelationTask:
    """The area relations of one input with ids in [low, high): picklable for a worker.

    ``lists``: the candidate lists of the node tasks that hold some (``relations`` entries of
    their results); ``blobs``: (offset, size) of the blobs holding those relations (osmium
    decodes them); ``sides``: the way tasks' member way files (``side`` entries of their
    results).
    """

    name: str
    input: str
    index: int
    low: int
    high: int
    lists: tuple[dict[str, Any], ...]
    blobs: tuple[tuple[int, int], ...]
    sides: tuple[dict[str, Any], ...]
    out_dir: str
    tag_filter: str
    rows_per_part: int


def _candidates(task: RelationTask) -> tuple[np.ndarray, np.ndarray]:
    """(relation ids, their member way ids, unique) of the task's id range."""
    ids: list[np.ndarray] = []
    members: list[np.ndarray] = []
    for entry in task.lists:
        with np.load(entry["path"]) as f:
            rid, count, member = f["ids"], f["counts"], f["members"]
        inside = (rid >= task.low) & (rid < task.high)
        if not inside.any():
            continue
        owner = np.repeat(inside, count)
        ids.append(rid[inside])
        members.append(member[owner])
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids), np.unique(np.concatenate(members))


def _member_ways(task: RelationTask, need: np.ndarray) -> list[bytes]:
    """PrimitiveBlocks of the member ways ``need`` (sorted) that the way tasks kept."""
    flats: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for side in task.sides:
        lo, hi = np.searchsorted(need, [side["min"], side["max"] + 1])
        if lo == hi:
            continue
        want = need[lo:hi]
        index = np.load(side["index"], mmap_mode="r")
        at = np.searchsorted(index[:, 0], want)
        at[at >= index.shape[0]] = index.shape[0] - 1
        rows = np.asarray(index[at[np.asarray(index[at, 0]) == want]])
        del index
        if rows.size == 0:
            continue
        data = np.memmap(side["data"], np.uint8, mode="r")
        flats.append(np.asarray(data[ranges(rows[:, 1], rows[:, 2])]))
        lengths.append(rows[:, 2])
        del data
    if not flats:
        return []
    return way_blocks(np.concatenate(flats), np.concatenate(lengths))


def relation_task(task: RelationTask) -> RelationStats:
    """Assemble the task's relations, write their areas sorted by id (``part-3-*``); return
    counts (``error`` set when the input cannot be read)."""
    tf = load_tag_filter(task.tag_filter)
    out = Path(task.out_dir)
    prefix = f"3-{task.index:05d}"
    remove_parts(out, prefix)
    dropped: Counter = Counter()
    ids, need = _candidates(task)
    handler = _RelationAreas(tf, dropped)
    if ids.size:
        manager = osmium.area.AreaManager()
        only = osmium.filter.IdFilter(ids.tolist())
        only.enable_for(osmium.osm.RELATION)
        try:
            with open(task.input, "rb") as f:
                relations = [read_blob(f, offset, size) for offset, size in task.blobs]
            buffer = osmium.io.FileBuffer(pbf_file(blobs=relations), "pbf")
            with osmium.io.Reader(buffer, osmium.osm.RELATION) as r:
                osmium.apply(r, only, manager.first_pass_handler())
        except (RuntimeError, OSError, ValueError) as e:
            return RelationStats(error=f"corrupt OSM PBF relation blocks ({e})")
        del relations, buffer
        buffer = osmium.io.FileBuffer(pbf_file(_member_ways(task, need)), "pbf")
        with osmium.io.Reader(buffer, osmium.osm.WAY) as r:
            osmium.apply(r, manager.second_pass_handler(key_filter(tf), handler))
    made = len(handler.batch)
    table = batch_to_table(handler.batch, dropped)
    table = table.take(pc.sort_indices(table["osm_id"]))
    writer = PartWriter(out, prefix, task.rows_per_part)
    writer.write(table)
    dropped["broken_multipolygon"] += max(0, int(ids.size) - made - dropped["broken_multipolygon"])
    return RelationStats(
        rows={"a": table.num_rows}, parts=writer.close(), dropped=dict(sorted((+dropped).items()))
    )
