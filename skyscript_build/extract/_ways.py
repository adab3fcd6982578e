"""The lines shard in bulk with numpy, straight from the PBF (no Python object per way).

All node locations are decoded from the DenseNodes blocks into sorted id -> (x, y) arrays; each
way block's Way messages are parsed with vectorised protobuf steps (one step per field, across
all ways of a group), the tags are judged once per distinct (key, value) string pair, and the
kept lines become WKB built with numpy. The rows, their order, batches and bytes are those of
the pyosmium path (``_shards._lines``): the same UNIQUE point rule, the same missing-node and
too-few-nodes drops, the same area rule for closed ways.

Anything unusual (plain nodes, a field out of the usual order, out-of-range coordinates,
duplicate node ids) raises ``Unsupported``; the caller then reads the shard through pyosmium.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tag_filters import TagFilter

from ._dense import (
    Unsupported,
    _blobs,
    _dense_points,
    _fields,
    _Judge,
    _packed_varints,
    _zigzag_delta,
    by_owner,
    data_block_parts,
    judge_tags,
)
from ._rules import is_area

__all__ = ["iter_points_and_lines"]

_LIMIT_X, _LIMIT_Y = 1_800_000_000, 900_000_000


def _div100(a: np.ndarray) -> np.ndarray:
    return np.sign(a) * (np.abs(a) // 100)


def _blocks(path: str) -> Iterator[tuple[bytes, tuple[int, int], dict[str, int], list]]:
    """(block, string-table span, meta, groups) of each OSMData block."""
    for kind, block in _blobs(path):
        if kind != "OSMData":
            continue
        yield block, *data_block_parts(block)


def _table(block: bytes, strings: tuple[int, int]) -> list[str]:
    return [
        block[s:e].decode("utf-8", "replace") for f, (s, e) in _fields(block, *strings) if f == 1
    ]


class _Nodes:
    """All node locations of a file: sorted ids and osmium's 1e-7 degree integers.

    In memory (16 bytes a node), or, with ``spill_dir``, in unnamed temporary files there,
    memory-mapped (the file must then list its nodes by id, as sorted files do).
    """

    def __init__(self, spill_dir: str | None = None) -> None:
        self.ids: list[np.ndarray] = []
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.spill: list[Any] = []
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            self.spill = [tempfile.TemporaryFile(dir=spill_dir) for _ in range(4)]  # noqa: SIM115
        self.count = 0
        self.last = -(1 << 63)

    def close(self) -> None:
        for f in self.spill:
            f.close()

    def add(
        self, block: bytes, dense: tuple[int, int], meta: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Add a DenseNodes group; return its (ids, lats, lons) as decoded (raw values)."""
        spans: dict[int, tuple[int, int]] = {}
        for field, value in _fields(block, *dense):
            if field in (1, 8, 9):
                spans[field] = value
        if 1 not in spans:
            return None
        ids = _zigzag_delta(_packed_varints(block, spans[1]))
        lat = _zigzag_delta(_packed_varints(block, spans[8]))
        lon = _zigzag_delta(_packed_varints(block, spans[9]))
        if not ids.size == lat.size == lon.size:
            raise Unsupported("DenseNodes fields of different lengths")
        gran = meta["granularity"]
        x = _div100(meta["lon_offset"] + gran * lon)
        y = _div100(meta["lat_offset"] + gran * lat)
        if (np.abs(x) > _LIMIT_X).any() or (np.abs(y) > _LIMIT_Y).any():
            raise Unsupported("a node location out of range")
        if self.spill:
            if ids.size and (ids[0] <= self.last or (ids.size > 1 and (np.diff(ids) <= 0).any())):
                raise Unsupported("nodes not sorted by id")
            for f, a in zip(
                self.spill, (ids, x.astype(np.int32), y.astype(np.int32)), strict=False
            ):
                f.write(a.tobytes())
        else:
            self.ids.append(ids)
            self.xs.append(x.astype(np.int32))
            self.ys.append(y.astype(np.int32))
        if ids.size:
            self.last = int(ids[-1])
            self.count += ids.size
        return ids, lat, lon

    def _mapped(self, i: int, dtype: Any) -> np.ndarray:
        self.spill[i].flush()
        return np.memmap(self.spill[i], dtype=dtype, mode="r", shape=(self.count,))

    def freeze(self) -> None:
        if self.spill and self.count:
            ids = self._mapped(0, np.int64)
            xs, ys = self._mapped(1, np.int32), self._mapped(2, np.int32)
        else:
            ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
            xs = np.concatenate(self.xs) if self.xs else np.zeros(0, np.int32)
            ys = np.concatenate(self.ys) if self.ys else np.zeros(0, np.int32)
        self.ids, self.xs, self.ys = [], [], []
        if not self.spill and ids.size > 1 and not (np.diff(ids) > 0).all():
            order = np.argsort(ids, kind="stable")
            ids, xs, ys = ids[order], xs[order], ys[order]
            if (np.diff(ids) == 0).any():
                raise Unsupported("duplicate node ids")
        self.id_arr, self.x_arr, self.y_arr = ids, xs, ys
        # Ids packed densely (a renumbered file): one array lookup instead of a binary search.
        self.direct: np.ndarray | None = None
        self.base = int(ids[0]) if ids.size else 0
        if ids.size and int(ids[-1]) - self.base < 4 * ids.size:
            size = int(ids[-1]) - self.base + 2
            if self.spill:
                self.direct = np.memmap(self.spill[3], dtype=np.int32, mode="w+", shape=(size,))
                self.direct.fill(-1)
            else:
                self.direct = np.full(size, -1, np.int32)
            for start in range(0, ids.size, 1 << 22):  # bounded temporaries
                chunk = np.asarray(ids[start : start + (1 << 22)])
                self.direct[chunk - self.base] = np.arange(
                    start, start + chunk.size, dtype=np.int32
                )

    def lookup(self, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, x, y) of node ids (x, y meaningless where not found)."""
        ids = self.id_arr
        if ids.size == 0:
            z = np.zeros(refs.size, np.int32)
            return np.zeros(refs.size, bool), z, z
        if self.direct is not None:
            rel = refs - self.base
            rel[(rel < 0) | (rel >= self.direct.size)] = self.direct.size - 1  # -1 there
            at = self.direct[rel]
            found = at >= 0
            at[~found] = 0
        else:
            at = np.searchsorted(ids, refs)
            at[at >= ids.size] = ids.size - 1
            found = ids[at] == refs
        return found, self.x_arr[at], self.y_arr[at]


def _varint_at(raw: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varints starting at ``pos`` (``raw`` padded with 10 zero bytes) -> (values, next pos)."""
    window = raw[pos[:, None] + np.arange(10)]
    length = np.argmax(window < 0x80, axis=1) + 1
    payload = (window & 0x7F).astype(np.uint64) << (7 * np.arange(10, dtype=np.uint64))
    payload[np.arange(10) >= length[:, None]] = 0
    return payload.sum(axis=1, dtype=np.uint64), pos + length


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The concatenated index ranges [starts[i], ends[i])."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total) + first


def _packed(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed varint fields of many messages -> (all values, per-message counts)."""
    data = raw[_ranges(starts, ends)]
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


# Way fields in the order osmium (and most writers) store them: keys, vals, info, refs, lats, lons.
_WAY_FIELDS = ((2, 0x12), (3, 0x1A), (4, 0x22), (8, 0x42), (9, 0x4A), (10, 0x52))


class _Ways:
    """The Way messages of one group, parsed across all ways at once."""

    def __init__(self, block: bytes, group: tuple[int, int]) -> None:
        starts: list[int] = []
        ends: list[int] = []
        pos, end = group
        while pos < end:
            if block[pos] != 0x1A:
                raise Unsupported("a group mixing ways with other objects")
            length = block[pos + 1]
            pos += 2
            if length & 0x80:
                length &= 0x7F
                shift = 7
                while True:
                    b = block[pos]
                    pos += 1
                    length |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
            starts.append(pos)
            pos += length
            ends.append(pos)
        raw = np.frombuffer(block, np.uint8)
        raw = np.concatenate((raw, np.zeros(10, np.uint8)))
        self.raw = raw
        p = np.asarray(starts, np.int64)
        e = np.asarray(ends, np.int64)
        if (raw[p] != 0x08).any():
            raise Unsupported("a way without its id first")
        ids, p = _varint_at(raw, p + 1)
        self.ids = ids.astype(np.int64)
        self.spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for field, tag in _WAY_FIELDS:
            here = (p < e) & (raw[np.minimum(p, raw.size - 1)] == tag)
            s = p.copy()
            f_end = p.copy()
            if here.any():
                flen, body = _varint_at(raw, p[here] + 1)
                s[here] = body
                f_end[here] = body + flen.astype(np.int64)
            self.spans[field] = (s, f_end)
            p = f_end
        if (p != e).any():
            raise Unsupported("a way field out of the usual order")

    def __len__(self) -> int:
        return self.ids.size

    def packed(self, field: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.spans[field]
        return _packed(self.raw, s, e)


class _LineBuilder:
    """Judges the ways of a block and builds the kept lines' columns."""

    def __init__(self, judge: _Judge, nodes: _Nodes, counts: Counter, dropped: Counter) -> None:
        self.judge = judge
        self.nodes = nodes
        self.counts = counts
        self.dropped = dropped

    def __call__(
        self, block: bytes, strings: tuple[int, int], group: tuple[int, int]
    ) -> dict | None:
        ways = _Ways(block, group)
        n = len(ways)
        if n == 0:
            return None
        kidx, kcount = ways.packed(2)
        vidx, vcount = ways.packed(3)
        if not np.array_equal(kcount, vcount):
            raise Unsupported("a way with keys and values of different counts")
        table = _table(block, strings)
        kidx = kidx.astype(np.int64)
        vidx = vidx.astype(np.int64)
        judged = judge_tags(self.judge, table, kidx, vidx)
        if judged is None:
            return None
        keep, gsd = judged
        tag_way = np.repeat(np.arange(n), kcount)
        kept_way = np.zeros(n, bool)
        kept_way[tag_way[keep]] = True
        # Refs of every way (delta coded within a way).
        raw_refs, rcount = ways.packed(8)
        deltas = (raw_refs >> np.uint64(1)).astype(np.int64) ^ -(raw_refs & np.uint64(1)).astype(
            np.int64
        )
        cs = np.cumsum(deltas)
        rstart = np.concatenate(([0], np.cumsum(rcount)[:-1]))
        base = np.where(rstart > 0, cs[np.maximum(rstart - 1, 0)], 0)
        refs = cs - np.repeat(base, rcount)
        rend = rstart + rcount
        closed = np.zeros(n, bool)
        big = rcount >= 4
        closed[big] = refs[rstart[big]] == refs[rend[big] - 1]
        # Closed ways that are areas belong to the areas shard.
        closed_kept = np.flatnonzero(kept_way & closed)
        if closed_kept.size:
            tstart = np.concatenate(([0], np.cumsum(kcount))).tolist()
            klist, vlist = kidx.tolist(), vidx.tolist()
        for w in closed_kept.tolist():
            t0, t1 = tstart[w], tstart[w + 1]
            tags = {table[k]: table[v] for k, v in zip(klist[t0:t1], vlist[t0:t1], strict=True)}
            if is_area(tags):
                self.counts["expected_way_areas"] += 1
                kept_way[w] = False
        # Geometry: osmium's UNIQUE rule (repeated locations dropped, leading missing nodes
        # skipped, a missing node after a located one is an error), then the ALL check.
        ref_way = np.repeat(np.arange(n), rcount)
        sel = kept_way[ref_way]
        found_s, x_s, y_s = self.nodes.lookup(refs[sel])
        way_s = ref_way[sel]
        sel_counts = rcount[kept_way]
        sstart = np.repeat(np.concatenate(([0], np.cumsum(sel_counts)[:-1])), sel_counts)
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
        too_few = kept_way & ~bad_missing & (npoints < 2)
        missing = kept_way & (bad_missing | (~too_few & any_missing))
        self.dropped["missing_nodes"] += int(missing.sum())
        self.dropped["too_few_nodes"] += int(too_few.sum())
        out = kept_way & ~missing & ~too_few
        if not out.any():
            return None
        # WKB: byte order, type 2 (LineString), count, then lon/lat doubles.
        pmask = point & out[way_s]
        px, py = x_s[pmask], y_s[pmask]
        counts = npoints[out]
        size = 9 + 16 * counts
        offsets = np.zeros(counts.size + 1, np.int64)
        np.cumsum(size, out=offsets[1:])
        buf = np.zeros(int(offsets[-1]), np.uint8)
        head = np.zeros((counts.size, 9), np.uint8)
        head[:, 0] = 1
        head[:, 1] = 2
        head[:, 5:9] = counts.astype("<u4").view(np.uint8).reshape(-1, 4)
        buf[_ranges(offsets[:-1], offsets[:-1] + 9)] = head.ravel()
        coords = np.empty((px.size, 2), "<f8")
        coords[:, 0] = px / 1e7
        coords[:, 1] = py / 1e7
        pstart = np.repeat(offsets[:-1] + 9, counts)
        within = np.arange(px.size) - np.repeat(
            np.concatenate(([0], np.cumsum(counts)[:-1])), counts
        )
        buf[_ranges(pstart + 16 * within, pstart + 16 * within + 16)] = coords.view(
            np.uint8
        ).ravel()
        wkb = pa.Array.from_buffers(
            pa.large_binary(), counts.size, [None, pa.py_buffer(offsets), pa.py_buffer(buf)]
        ).cast(pa.binary())
        # Tags: kept ways' groundable tags, in the way's own order.
        tmask = out[tag_way[keep]]
        tkeep, tgsd = keep[tmask], gsd[tmask]
        tway = tag_way[tkeep]
        order = by_owner(tway)
        tkeep, tgsd, tway = tkeep[order], tgsd[order], tway[order]
        ways_out, first, tcounts = np.unique(tway, return_index=True, return_counts=True)
        best = np.maximum.reduceat(tgsd, first)
        strings_arr = pa.array(table, pa.string())
        return {
            "ids": ways.ids[ways_out],
            "tag_counts": tcounts,
            "keys": strings_arr.take(pa.array(kidx[tkeep])),
            "values": strings_arr.take(pa.array(vidx[tkeep])),
            "max_gsd": best,
            "wkb": wkb,
        }


def iter_points_and_lines(
    path: str,
    tf: TagFilter,
    batch_rows: int,
    to_table: Callable[..., pa.Table],
    counts: Counter,
    dropped: Counter,
    spill_dir: str | None = None,
) -> Iterator[tuple[str, Any]]:
    """The points and lines of ``path``: ``("n", PointBlock)`` per block with any (as
    ``_dense.iter_point_blocks``), then ``("w", table)`` of exactly ``batch_rows`` rows (the
    last one fewer).

    ``to_table`` is ``_parquet.columns_to_table``. Raises ``Unsupported`` for files it does not
    decode (possibly after some items were yielded: the caller discards them). ``spill_dir``:
    keep the node locations in temporary files there rather than in memory.
    """
    judge = _Judge(tf)
    nodes = _Nodes(spill_dir)
    try:
        yield from _points_and_lines(path, nodes, judge, batch_rows, to_table, counts, dropped)
    finally:
        nodes.close()


def _points_and_lines(
    path: str,
    nodes: _Nodes,
    judge: _Judge,
    batch_rows: int,
    to_table: Callable[..., pa.Table],
    counts: Counter,
    dropped: Counter,
) -> Iterator[tuple[str, Any]]:
    build: _LineBuilder | None = None
    pending: list[dict] = []
    rows = 0
    for block, strings, meta, groups in _blocks(path):
        for group in groups:
            field = next(_fields(block, *group), (0, None))[0]
            if field == 1:
                raise Unsupported("plain (not dense) nodes")
            if field == 2:
                if build is not None:
                    raise Unsupported("nodes after ways (an unsorted file)")
                dense = next(_fields(block, *group))[1]
                decoded = nodes.add(block, dense, meta)
                table = _table(block, strings)
                points = _dense_points(block, dense, table, meta, judge, decoded)
                if points is not None and (len(points) or points.invalid):
                    yield "n", points
                continue
            if field != 3:
                continue
            if build is None:
                nodes.freeze()
                build = _LineBuilder(judge, nodes, counts, dropped)
            cols = build(block, strings, group)
            if cols is None:
                continue
            pending.append(cols)
            rows += cols["ids"].size
            if rows >= batch_rows:
                merged = _merge(pending)
                start = 0
                while rows - start >= batch_rows:
                    yield "w", _to_table(_cut(merged, start, start + batch_rows), to_table)
                    start += batch_rows
                pending = [_cut(merged, start, rows)] if rows > start else []
                rows -= start
    if rows:
        yield "w", _to_table(_merge(pending), to_table)


def _merge(pending: list[dict]) -> dict:
    if len(pending) == 1:
        return pending[0]
    return {
        "ids": np.concatenate([p["ids"] for p in pending]),
        "tag_counts": np.concatenate([p["tag_counts"] for p in pending]),
        "keys": pa.concat_arrays([p["keys"] for p in pending]),
        "values": pa.concat_arrays([p["values"] for p in pending]),
        "max_gsd": np.concatenate([p["max_gsd"] for p in pending]),
        "wkb": pa.concat_arrays([p["wkb"] for p in pending]),
    }


def _cut(cols: dict, a: int, b: int) -> dict:
    toff = np.concatenate(([0], np.cumsum(cols["tag_counts"])))
    t0, t1 = int(toff[a]), int(toff[b])
    return {
        "ids": cols["ids"][a:b],
        "tag_counts": cols["tag_counts"][a:b],
        "keys": cols["keys"].slice(t0, t1 - t0),
        "values": cols["values"].slice(t0, t1 - t0),
        "max_gsd": cols["max_gsd"][a:b],
        "wkb": cols["wkb"].slice(a, b - a),
    }


def _to_table(cols: dict, to_table: Callable[..., pa.Table]) -> pa.Table:
    counts = cols["tag_counts"]
    offsets = np.zeros(counts.size + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    n = counts.size
    return to_table(
        "w",
        pa.array(np.full(n, "way", dtype=object), pa.string()),
        cols["ids"],
        offsets,
        pa.concat_arrays([cols["keys"]]),
        pa.concat_arrays([cols["values"]]),
        cols["max_gsd"],
        pa.concat_arrays([cols["wkb"]]),
    )
