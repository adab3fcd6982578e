"""Ways in bulk with numpy, straight from the PBF (no Python object per way).

A way task decodes each group of Way messages with vectorised protobuf steps (one step per
field, across all ways of the group), judges the tags once per distinct (key, value) string pair
of the block, and looks up the node locations it needs in the node stores (``_nodestore``).
Then, per group:

- lines (open ways, and closed ways the area rule calls lines) become WKB built with numpy:
  osmium's UNIQUE point rule, its missing-node and too-few-nodes drops;
- closed ways that are areas are written again with their locations (``_encode``) for osmium
  to assemble (``_areas``);
- member ways of candidate relations are written again with their locations for the relation
  tasks.

A group the bulk decoder (``_pbf.Elements``) does not cover (a field out of the usual order,
say) raises ``Unsupported``; the caller then decodes the block with pyosmium
(``decode_with_osmium``) into the same arrays.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import osmium
import pyarrow as pa

from ._dense import TagJudge, by_owner, judge_tags
from ._encode import UNDEFINED, pbf_file, ranges, way_messages
from ._nodestore import NodeStore
from ._pbf import Elements, StringTable
from ._rules import RULE_KEYS, area_vote

__all__ = [
    "WayGroup",
    "decode_way_group",
    "decode_with_osmium",
    "WayBuilder",
    "rows_table",
    "concat_columns",
    "take_rows",
]


@dataclass
class WayGroup:
    """The ways of one group as flat arrays: ``kcount[i]`` tags (string-table indices ``kidx``,
    ``vidx``) and ``rcount[i]`` node ids (``refs``) for way i."""

    ids: np.ndarray
    kidx: np.ndarray
    vidx: np.ndarray
    kcount: np.ndarray
    refs: np.ndarray
    rcount: np.ndarray
    table: StringTable


def decode_way_group(block: bytes, group: tuple[int, int], table: StringTable) -> WayGroup | None:
    """The ways of a group of ``block`` (None when it has none)."""
    ways = Elements(block, group)
    if len(ways) == 0:
        return None
    kidx, vidx, kcount = ways.tags()
    refs, rcount = ways.deltas(8)
    return WayGroup(ways.ids, kidx, vidx, kcount, refs, rcount, table)


def decode_with_osmium(raw_blob: bytes) -> WayGroup | None:
    """The ways of one raw Blob message through pyosmium (any PBF osmium reads)."""
    index: dict[str, int] = {"": 0}
    ids: list[int] = []
    tags: list[int] = []
    kcount: list[int] = []
    refs: list[int] = []
    rcount: list[int] = []
    buffer = osmium.io.FileBuffer(pbf_file(blobs=[raw_blob]), "pbf")
    w: Any
    for w in osmium.FileProcessor(buffer, osmium.osm.WAY):
        ids.append(w.id)
        n = 0
        for t in w.tags:
            tags.append(index.setdefault(t.k, len(index)))
            tags.append(index.setdefault(t.v, len(index)))
            n += 1
        kcount.append(n)
        nodes = [nd.ref for nd in w.nodes]
        refs.extend(nodes)
        rcount.append(len(nodes))
    if not ids:
        return None
    pairs = np.array(tags, np.int64).reshape(-1, 2)
    return WayGroup(
        np.array(ids, np.int64),
        pairs[:, 0].copy(),
        pairs[:, 1].copy(),
        np.array(kcount, np.int64),
        np.array(refs, np.int64),
        np.array(rcount, np.int64),
        StringTable.of_list(list(index)),
    )


@dataclass
class WayOutput:
    """What a group of ways gives: line columns (``rows_table``), area candidates and member
    ways, the last two as way messages with their locations (``_encode.way_messages``)."""

    lines: dict[str, Any] | None = None
    areas: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None  # + their tag columns
    members: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # + their ids


class WayBuilder:
    """Judges the ways of a group, looks up their node locations, builds their outputs."""

    def __init__(
        self,
        judge: TagJudge,
        store: NodeStore,
        is_member: Callable[[np.ndarray], np.ndarray],
        counts: Counter,
        dropped: Counter,
    ) -> None:
        self.judge = judge
        self.store = store
        self.is_member = is_member
        self.counts = counts
        self.dropped = dropped

    def __call__(self, g: WayGroup) -> WayOutput | None:
        n = g.ids.size
        table, kidx, vidx, kcount, rcount = g.table, g.kidx, g.vidx, g.kcount, g.rcount
        judged = judge_tags(self.judge, table, kidx, vidx)
        tag_way = np.repeat(np.arange(n), kcount)
        kept_way = np.zeros(n, bool)
        keep, gsd = np.zeros(0, np.int64), np.zeros(0)
        if judged is not None:
            keep, gsd = judged
            kept_way[tag_way[keep]] = True
        member = self.is_member(g.ids)
        if not kept_way.any() and not member.any():
            return None
        refs = g.refs
        first_ref = np.cumsum(rcount) - rcount
        closed = np.zeros(n, bool)
        big = rcount >= 4  # a closed way has at least 4 references
        closed[big] = refs[first_ref[big]] == refs[first_ref[big] + rcount[big] - 1]
        # Closed ways that are areas go to osmium's area assembly, the others are lines.
        area = kept_way & closed
        if area.any():
            area &= _are_areas(g, tag_way, area)
        self.counts["expected_way_areas"] += int(area.sum())
        line = kept_way & ~area
        ref_way = np.repeat(np.arange(n), rcount)
        sel = (line | area | member)[ref_way]
        found, x, y = self.store.lookup(refs[sel])
        way_s = ref_way[sel]
        out = WayOutput()
        if line.any():
            on = line[way_s]
            out.lines = self._lines(g, line, keep, gsd, tag_way, found[on], x[on], y[on], way_s[on])
        if area.any() or member.any():
            xs = np.where(found, x, UNDEFINED)
            ys = np.where(found, y, UNDEFINED)
            refs_s = refs[sel]
        if area.any():
            on = area[way_s]
            # osmium skips a way without tags: each gets area=yes (strings 1 and 2 of
            # ``_encode.AREA_STRINGS``); the real tags come from this decoding.
            count = int(area.sum())
            one = np.ones(count, np.int64)
            flat, lengths = way_messages(
                g.ids[area], refs_s[on], rcount[area], xs[on], ys[on], one, one * 2, one
            )
            out.areas = (flat, lengths, _tag_columns(g, area, keep, gsd, tag_way))
        if member.any():
            on = member[way_s]
            flat, lengths = way_messages(g.ids[member], refs_s[on], rcount[member], xs[on], ys[on])
            out.members = (flat, lengths, g.ids[member])
        return out

    def _lines(
        self,
        g: WayGroup,
        line: np.ndarray,
        keep: np.ndarray,
        gsd: np.ndarray,
        tag_way: np.ndarray,
        found_s: np.ndarray,
        x_s: np.ndarray,
        y_s: np.ndarray,
        way_s: np.ndarray,
    ) -> dict[str, Any] | None:
        """Line columns of the ways ``line`` (``*_s``: their node references in order, found
        or not, located at x, y, of way ``way_s``): osmium's UNIQUE rule (repeated locations
        dropped, leading missing nodes skipped, a missing node after a located one is an
        error), then its ALL check."""
        n = g.ids.size
        way_start = np.repeat(np.cumsum(g.rcount[line]) - g.rcount[line], g.rcount[line])
        located_before = np.concatenate(([0], np.cumsum(found_s)))[:-1]
        after_located = located_before - located_before[way_start] > 0
        bad_missing = np.zeros(n, bool)
        bad_missing[way_s[~found_s & after_located]] = True
        repeated = np.zeros(way_s.size, bool)
        if way_s.size > 1:
            repeated[1:] = (way_s[1:] == way_s[:-1]) & (x_s[1:] == x_s[:-1])
            repeated[1:] &= (y_s[1:] == y_s[:-1]) & (found_s[1:] == found_s[:-1])
        point = found_s & ~repeated
        npoints = np.bincount(way_s[point], minlength=n)
        any_missing = np.zeros(n, bool)
        any_missing[way_s[~found_s]] = True
        too_few = line & ~bad_missing & (npoints < 2)
        missing = line & (bad_missing | (~too_few & any_missing))
        self.dropped["missing_nodes"] += int(missing.sum())
        self.dropped["too_few_nodes"] += int(too_few.sum())
        out = line & ~missing & ~too_few
        if not out.any():
            return None
        points = point & out[way_s]
        wkb, bbox = _linestrings(x_s[points] / 1e7, y_s[points] / 1e7, npoints[out])
        return {**_tag_columns(g, out, keep, gsd, tag_way), "wkb": wkb, "bbox": bbox}


def _linestrings(
    lon: np.ndarray, lat: np.ndarray, counts: np.ndarray
) -> tuple[pa.Array, np.ndarray]:
    """LineString WKB (byte order, type 2, count, then lon/lat doubles) of ``counts[i]``
    points each, from the points of all lines in order; and each line's bounding box."""
    size = 9 + 16 * counts
    offsets = np.zeros(counts.size + 1, np.int64)
    np.cumsum(size, out=offsets[1:])
    buf = np.zeros(int(offsets[-1]), np.uint8)
    head = np.zeros((counts.size, 9), np.uint8)
    head[:, 0] = 1
    head[:, 1] = 2
    head[:, 5:9] = counts.astype("<u4").view(np.uint8).reshape(-1, 4)
    buf[ranges(offsets[:-1], np.full(counts.size, 9))] = head.ravel()
    coords = np.empty((lon.size, 2), "<f8")
    coords[:, 0] = lon
    coords[:, 1] = lat
    first = np.cumsum(counts) - counts
    point_start = np.repeat(offsets[:-1] + 9, counts)
    within = np.arange(lon.size) - np.repeat(first, counts)
    buf[ranges(point_start + 16 * within, np.full(lon.size, 16))] = coords.view(np.uint8).ravel()
    wkb = pa.Array.from_buffers(
        pa.large_binary(), counts.size, [None, pa.py_buffer(offsets), pa.py_buffer(buf)]
    ).cast(pa.binary())
    bbox = np.stack(
        [
            np.minimum.reduceat(lon, first),
            np.minimum.reduceat(lat, first),
            np.maximum.reduceat(lon, first),
            np.maximum.reduceat(lat, first),
        ],
        axis=1,
    )
    return wkb, bbox


def _are_areas(g: WayGroup, tag_way: np.ndarray, ways: np.ndarray) -> np.ndarray:
    """``_rules.is_area`` of the ways ``ways`` (a mask), from each distinct tag of the block."""
    n = g.ids.size
    table = g.table
    used = np.unique(g.kidx[ways[tag_way]]).tolist()
    rule_key = np.zeros(len(table), bool)
    rule_key[used] = [table[k] in RULE_KEYS for k in used]
    entries = np.flatnonzero(rule_key[g.kidx] & ways[tag_way])
    width = len(table)
    pairs, inverse = np.unique(g.kidx[entries] * width + g.vidx[entries], return_inverse=True)
    votes = np.array([area_vote(table[p // width], table[p % width]) for p in pairs.tolist()])
    vote = votes[inverse] if entries.size else np.zeros(0, np.int64)
    owner = tag_way[entries]
    yes = np.bincount(owner[vote == 2], minlength=n) > 0
    no = np.bincount(owner[vote == -1], minlength=n) > 0
    makes = np.bincount(owner[vote == 1], minlength=n) > 0
    return yes | (~no & makes)


def _tag_columns(
    g: WayGroup, rows: np.ndarray, keep: np.ndarray, gsd: np.ndarray, tag_way: np.ndarray
) -> dict[str, Any]:
    """Ids and groundable tags (in each way's own order) of the ways ``rows`` (``keep``: the
    groundable tags' entries, ``gsd`` theirs; ``tag_way``: each entry's way)."""
    mine = rows[tag_way[keep]]
    entries, entry_gsd = keep[mine], gsd[mine]
    way = tag_way[entries]
    order = by_owner(way)
    entries, entry_gsd, way = entries[order], entry_gsd[order], way[order]
    ways_out, first_tag, tag_counts = np.unique(way, return_index=True, return_counts=True)
    return {
        "ids": g.ids[ways_out],
        "tag_counts": tag_counts,
        "keys": g.table.arrow(g.kidx[entries]),
        "values": g.table.arrow(g.vidx[entries]),
        "max_gsd": np.maximum.reduceat(entry_gsd, first_tag),
    }


def take_rows(cols: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """Rows ``rows`` of tag columns (``ids``, ``tag_counts``, ``keys``, ``values``,
    ``max_gsd``)."""
    counts = cols["tag_counts"]
    start = np.cumsum(counts) - counts
    tags = pa.array(ranges(start[rows], counts[rows]))
    return {
        "ids": cols["ids"][rows],
        "tag_counts": counts[rows],
        "keys": cols["keys"].take(tags),
        "values": cols["values"].take(tags),
        "max_gsd": cols["max_gsd"][rows],
    }


def concat_columns(pending: list[dict]) -> dict:
    """Columns of several groups as one."""
    if len(pending) == 1:
        return pending[0]
    return {
        "ids": np.concatenate([p["ids"] for p in pending]),
        "tag_counts": np.concatenate([p["tag_counts"] for p in pending]),
        "keys": pa.concat_arrays([p["keys"] for p in pending]),
        "values": pa.concat_arrays([p["values"] for p in pending]),
        "max_gsd": np.concatenate([p["max_gsd"] for p in pending]),
        **{
            k: (pa.concat_arrays if k == "wkb" else np.concatenate)([p[k] for p in pending])
            for k in ("wkb", "bbox")
            if k in pending[0]
        },
    }


def rows_table(cols: dict, to_table: Callable[..., pa.Table], osm_type: str = "w") -> pa.Table:
    """Line (or area) columns -> a table (``to_table`` is ``_parquet.columns_to_table``)."""
    counts = cols["tag_counts"]
    offsets = np.zeros(counts.size + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    n = counts.size
    return to_table(
        osm_type,
        pa.array(np.full(n, "way", dtype=object), pa.string()),
        cols["ids"],
        offsets,
        pa.concat_arrays([cols["keys"]]),
        pa.concat_arrays([cols["values"]]),
        cols["max_gsd"],
        pa.concat_arrays([cols["wkb"]]),
        cols["bbox"],
    )
