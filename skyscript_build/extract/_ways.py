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

A group this reader does not decode (a field out of the usual order, say) raises
``Unsupported``; the caller then decodes the block with pyosmium (``decode_with_osmium``) into
the same arrays.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import osmium
import pyarrow as pa

from ._dense import (
    StringTable,
    Unsupported,
    _Judge,
    _packed_varints,
    by_owner,
    judge_tags,
    repeated_field,
)
from ._encode import UNDEFINED, pbf_file, ranges, way_messages
from ._nodestore import NodeStore
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


def _varint_at(raw: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varints starting at ``pos`` (``raw`` padded with 10 zero bytes) -> (values, next pos)."""
    window = raw[pos[:, None] + np.arange(10)]
    length = np.argmax(window < 0x80, axis=1) + 1
    payload = (window & 0x7F).astype(np.uint64) << (7 * np.arange(10, dtype=np.uint64))
    payload[np.arange(10) >= length[:, None]] = 0
    return payload.sum(axis=1, dtype=np.uint64), pos + length


def _packed(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed varint fields of many messages -> (all values, per-message counts)."""
    data = raw[ranges(starts, ends - starts)]
    ends_mask = data < 0x80
    cum = np.concatenate(([0], np.cumsum(ends_mask)))
    bounds = np.concatenate(([0], np.cumsum(ends - starts)))
    counts = cum[bounds[1:]] - cum[bounds[:-1]]
    if data.size == 0:
        return np.zeros(0, np.uint64), counts
    if not ends_mask[-1]:
        raise Unsupported("a packed field cut inside a varint")
    data_bytes = data.tobytes()
    return _packed_varints(data_bytes, (0, len(data_bytes))), counts


# Way and Relation fields in the order osmium (and most writers) store them: keys, vals, info,
# then refs, lats, lons of a way, or roles, member ids, member types of a relation.
_FIELDS = ((2, 0x12), (3, 0x1A), (4, 0x22), (8, 0x42), (9, 0x4A), (10, 0x52))


class Elements:
    """The Way (group field 3, ``tag`` 0x1A) or Relation (field 4, 0x22) messages of one
    group, parsed across all of them at once."""

    def __init__(self, block: bytes, group: tuple[int, int], tag: int = 0x1A) -> None:
        spans = repeated_field(block, group, tag, "a group mixing elements of two kinds")
        starts = [s for s, _ in spans]
        ends = [e for _, e in spans]
        raw = np.frombuffer(block, np.uint8)
        raw = np.concatenate((raw, np.zeros(10, np.uint8)))
        self.raw = raw
        p = np.asarray(starts, np.int64)
        e = np.asarray(ends, np.int64)
        if (raw[p] != 0x08).any():
            raise Unsupported("an element without its id first")
        ids, p = _varint_at(raw, p + 1)
        self.ids = ids.astype(np.int64)
        self.spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for field, field_tag in _FIELDS:
            here = (p < e) & (raw[np.minimum(p, raw.size - 1)] == field_tag)
            s = p.copy()
            f_end = p.copy()
            if here.any():
                flen, body = _varint_at(raw, p[here] + 1)
                s[here] = body
                f_end[here] = body + flen.astype(np.int64)
            self.spans[field] = (s, f_end)
            p = f_end
        if (p != e).any():
            raise Unsupported("an element field out of the usual order")

    def tags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key indices, value indices, tags per element)."""
        kidx, kcount = self.packed(2)
        vidx, vcount = self.packed(3)
        if not np.array_equal(kcount, vcount):
            raise Unsupported("an element with keys and values of different counts")
        return kidx.astype(np.int64), vidx.astype(np.int64), kcount

    def deltas(self, field: int) -> tuple[np.ndarray, np.ndarray]:
        """A packed sint64 field delta-coded within each element -> (values, per element)."""
        raw, count = self.packed(field)
        deltas = (raw >> np.uint64(1)).astype(np.int64) ^ -(raw & np.uint64(1)).astype(np.int64)
        cs = np.cumsum(deltas)
        start = np.cumsum(count) - count
        base = np.where(start > 0, cs[np.maximum(start - 1, 0)], 0)
        return cs - np.repeat(base, count), count

    def __len__(self) -> int:
        return self.ids.size

    def packed(self, field: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.spans[field]
        return _packed(self.raw, s, e)


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
        judge: _Judge,
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
        rstart = np.cumsum(rcount) - rcount
        rend = rstart + rcount
        closed = np.zeros(n, bool)
        big = rcount >= 4
        closed[big] = refs[rstart[big]] == refs[rend[big] - 1]
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
        """Line columns of the ways ``line``: osmium's UNIQUE rule (repeated locations dropped,
        leading missing nodes skipped, a missing node after a located one is an error), then
        its ALL check."""
        n = g.ids.size
        sel_counts = g.rcount[line]
        sstart = np.repeat(np.cumsum(sel_counts) - sel_counts, sel_counts)
        located_before = np.concatenate(([0], np.cumsum(found_s)))[:-1]
        after_located = located_before - located_before[sstart] > 0
        bad_missing = np.zeros(n, bool)
        bad_missing[way_s[~found_s & after_located]] = True
        same = np.zeros(way_s.size, bool)
        if way_s.size > 1:
            same[1:] = (way_s[1:] == way_s[:-1]) & (x_s[1:] == x_s[:-1]) & (y_s[1:] == y_s[:-1])
            same[1:] &= found_s[1:] == found_s[:-1]
        point = found_s & ~same
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
        # WKB: byte order, type 2 (LineString), count, then lon/lat doubles.
        pmask = point & out[way_s]
        px, py = x_s[pmask] / 1e7, y_s[pmask] / 1e7
        counts = npoints[out]
        size = 9 + 16 * counts
        offsets = np.zeros(counts.size + 1, np.int64)
        np.cumsum(size, out=offsets[1:])
        buf = np.zeros(int(offsets[-1]), np.uint8)
        head = np.zeros((counts.size, 9), np.uint8)
        head[:, 0] = 1
        head[:, 1] = 2
        head[:, 5:9] = counts.astype("<u4").view(np.uint8).reshape(-1, 4)
        buf[ranges(offsets[:-1], np.full(counts.size, 9))] = head.ravel()
        coords = np.empty((px.size, 2), "<f8")
        coords[:, 0] = px
        coords[:, 1] = py
        first = np.cumsum(counts) - counts
        pstart = np.repeat(offsets[:-1] + 9, counts)
        within = np.arange(px.size) - np.repeat(first, counts)
        buf[ranges(pstart + 16 * within, np.full(px.size, 16))] = coords.view(np.uint8).ravel()
        wkb = pa.Array.from_buffers(
            pa.large_binary(), counts.size, [None, pa.py_buffer(offsets), pa.py_buffer(buf)]
        ).cast(pa.binary())
        bbox = np.stack(
            [
                np.minimum.reduceat(px, first),
                np.minimum.reduceat(py, first),
                np.maximum.reduceat(px, first),
                np.maximum.reduceat(py, first),
            ],
            axis=1,
        )
        return {**_tag_columns(g, out, keep, gsd, tag_way), "wkb": wkb, "bbox": bbox}


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
    """Ids and groundable tags (in each way's own order) of the ways ``rows``."""
    tmask = rows[tag_way[keep]]
    tkeep, tgsd = keep[tmask], gsd[tmask]
    tway = tag_way[tkeep]
    order = by_owner(tway)
    tkeep, tgsd, tway = tkeep[order], tgsd[order], tway[order]
    ways_out, first_tag, tcounts = np.unique(tway, return_index=True, return_counts=True)
    return {
        "ids": g.ids[ways_out],
        "tag_counts": tcounts,
        "keys": g.table.arrow(g.kidx[tkeep]),
        "values": g.table.arrow(g.vidx[tkeep]),
        "max_gsd": np.maximum.reduceat(tgsd, first_tag),
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
