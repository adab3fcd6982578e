"""Tagged nodes -> point tables straight from the PBF's DenseNodes blocks, in bulk with numpy.

Handing each node to Python through pyosmium costs several microseconds; with millions of
candidate nodes that was most of an extract's time. Here a block's packed varints are decoded
with numpy, the groundable tags are judged once per distinct (key, value) string pair of the
block, and a block's points become Arrow columns without a Python object per node. The rows,
their order and the coordinates are the same as through osmium (coordinates are osmium's
1e-7 degree integers divided by 1e7).

Files this reader does not cover (plain ``Node`` groups, compression other than zlib, lzma or
none, an empty tag value stored as string 0) raise ``Unsupported`` before any row is returned
for them; the caller then reads the nodes through pyosmium.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from tag_filters import TagFilter

__all__ = ["Unsupported", "PointBlock", "StringTable", "repeated_field"]


class Unsupported(Exception):
    """The file uses a PBF feature this reader does not decode."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message; length-delimited values as (start, end)."""
    pos = start
    end = len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield key >> 3, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield key >> 3, (pos, pos + length)
            pos += length
        elif wire == 1:
            yield key >> 3, buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield key >> 3, buf[pos : pos + 4]
            pos += 4
        else:
            raise Unsupported(f"protobuf wire type {wire}")


def repeated_field(
    block: bytes, span: tuple[int, int], tag: int, what: str
) -> list[tuple[int, int]]:
    """(start, end) of each value of a message that holds only one repeated length-delimited
    field (``tag``): a string table's strings, a group's ways; ``what`` names the message in
    the ``Unsupported`` raised for anything else."""
    spans = []
    pos, end = span
    while pos < end:
        if block[pos] != tag:
            raise Unsupported(what)
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
        spans.append((pos, pos + length))
        pos += length
    return spans


class StringTable:
    """A block's string table; a string is decoded when first asked for (a block has
    thousands, a few of which are candidate keys and their values)."""

    def __init__(self, block: bytes, spans: list[tuple[int, int]]) -> None:
        self.block, self.spans = block, spans
        self.cache: dict[int, str] = {}

    @classmethod
    def of_block(cls, block: bytes, span: tuple[int, int]) -> StringTable:
        """The table of ``block`` whose StringTable message lies at ``span``."""
        return cls(block, repeated_field(block, span, 0x0A, "a string table with another field"))

    @classmethod
    def of_list(cls, strings: list[str]) -> StringTable:
        table = cls(b"", [(0, 0)] * len(strings))
        table.cache = dict(enumerate(strings))
        return table

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> str:
        text = self.cache.get(i)
        if text is None:
            start, end = self.spans[i]
            text = self.cache[i] = self.block[start:end].decode("utf-8", "replace")
        return text

    def arrow(self, indices: np.ndarray) -> pa.Array:
        """The strings at ``indices`` as an Arrow array."""
        used, inverse = np.unique(indices, return_inverse=True)
        return pa.array([self[i] for i in used.tolist()], pa.string()).take(pa.array(inverse))


def _packed_varints(buf: bytes, span: tuple[int, int]) -> np.ndarray:
    """A packed varint field -> uint64 values, decoded in bulk (one numpy step per byte of
    the longest varint)."""
    raw = np.frombuffer(buf, dtype=np.uint8, count=span[1] - span[0], offset=span[0])
    last = raw < 0x80
    if last.all():
        return raw.astype(np.uint64)
    ends = np.flatnonzero(last)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    out = (raw[starts] & 0x7F).astype(np.uint64)
    for k in range(1, int(lengths.max())):
        more = np.flatnonzero(lengths > k)
        out[more] |= (raw[starts[more] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out


def _zigzag_delta(values: np.ndarray) -> np.ndarray:
    signed = (values >> np.uint64(1)).astype(np.int64) ^ -(values & np.uint64(1)).astype(np.int64)
    return np.cumsum(signed)


def _blobs(path: str) -> Iterator[tuple[str, bytes]]:
    """(type, decompressed block) of each blob of a PBF file (its header already checked)."""
    with open(path, "rb") as f:
        while True:
            head = f.read(4)
            if len(head) < 4:
                return
            (length,) = struct.unpack(">I", head)
            header = f.read(length)
            kind, size = "", 0
            for field, value in _fields(header):
                if field == 1:
                    kind = header[value[0] : value[1]].decode("ascii", "replace")
                elif field == 3:
                    size = value
            blob = f.read(size)
            try:
                data = _decompress(blob)
            except (zlib.error, lzma.LZMAError, IndexError) as e:
                raise ValueError(f"corrupt OSM PBF block ({e})") from None
            yield kind, data


def _decompress(blob: bytes) -> bytes:
    data: bytes | None = None
    for field, value in _fields(blob):
        if field == 1:
            data = blob[value[0] : value[1]]
        elif field == 3:
            data = zlib.decompress(blob[value[0] : value[1]])
        elif field == 4:
            data = lzma.decompress(blob[value[0] : value[1]])
        elif field in (5, 6, 7):
            raise Unsupported("a compression other than zlib or lzma")
    if data is None:
        raise Unsupported("an empty blob")
    return data


class PointBlock:
    """The points of one block as columns (tags in the node's own order within a row)."""

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        keys: pa.Array,
        values: pa.Array,
        max_gsd: np.ndarray,
        lons: np.ndarray,
        lats: np.ndarray,
        invalid: int,
    ) -> None:
        self.ids, self.offsets, self.keys, self.values = ids, offsets, keys, values
        self.max_gsd, self.lons, self.lats, self.invalid = max_gsd, lons, lats, invalid

    def __len__(self) -> int:
        return len(self.ids)


class _Judge:
    """(key, value) -> (groundable, max_gsd), cached over the whole file."""

    def __init__(self, tf: TagFilter) -> None:
        self.rule = tf.rule
        self.candidates = tf.candidate_keys()
        self.cache: dict[tuple[str, str], tuple[bool, float]] = {}

    def is_candidate(self, key: str) -> bool:
        return self.candidates is None or key in self.candidates

    def __call__(self, key: str, value: str) -> tuple[bool, float]:
        hit = self.cache.get((key, value))
        if hit is None:
            r = self.rule(key, value)
            ok = r is not None and r.groundable
            gsd = r.max_gsd if ok and r is not None and r.max_gsd is not None else -1.0
            hit = self.cache[(key, value)] = (ok, float(gsd))
        return hit


def _dense_points(
    block: bytes,
    dense: tuple[int, int],
    table: StringTable,
    meta: dict[str, int],
    judge: _Judge,
    decoded: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> PointBlock | None:
    """The points of one DenseNodes group; ``decoded``: its (ids, lats, lons) when the
    caller already decoded them (raw delta-decoded values)."""
    spans: dict[int, tuple[int, int]] = {}
    for field, value in _fields(block, *dense):
        if field in (1, 8, 9, 10):
            spans[field] = value
    if 1 not in spans:
        return None
    ids = decoded[0] if decoded is not None else _zigzag_delta(_packed_varints(block, spans[1]))
    n = ids.size
    kv = _packed_varints(block, spans[10]) if 10 in spans else np.zeros(0, np.uint64)
    if kv.size == 0:
        return None
    kv = kv.astype(np.int64)
    is_end = kv == 0
    if int(is_end.sum()) != n:
        raise Unsupported("a tag string stored as string 0 in DenseNodes")
    node_of = np.cumsum(is_end) - is_end  # node index of every entry
    entries = np.flatnonzero(~is_end)
    if entries.size % 2:
        raise Unsupported("odd DenseNodes keys_vals")
    kidx, vidx = kv[entries[0::2]], kv[entries[1::2]]
    pair_node = node_of[entries[0::2]]
    judged = judge_tags(judge, table, kidx, vidx)
    if judged is None:
        return None
    keep, gsd = judged
    pnode = pair_node[keep]
    order = by_owner(pnode)
    keep, gsd, pnode = keep[order], gsd[order], pnode[order]
    nodes, first, counts = np.unique(pnode, return_index=True, return_counts=True)
    offsets = np.zeros(nodes.size + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    best = np.maximum.reduceat(gsd, first)
    if decoded is not None:
        lat_raw, lon_raw = decoded[1][nodes], decoded[2][nodes]
    else:
        lat_raw = _zigzag_delta(_packed_varints(block, spans[8]))[nodes]
        lon_raw = _zigzag_delta(_packed_varints(block, spans[9]))[nodes]
    gran = meta["granularity"]
    # osmium: (offset + granularity * value) / 100 in C++ integer division (toward zero).
    x = _div100(meta["lon_offset"] + gran * lon_raw)
    y = _div100(meta["lat_offset"] + gran * lat_raw)
    valid = (np.abs(x) <= 1_800_000_000) & (np.abs(y) <= 900_000_000)
    keys = table.arrow(kidx[keep])
    values = table.arrow(vidx[keep])
    block_out = PointBlock(
        ids[nodes], offsets, keys, values, best, x / 1e7, y / 1e7, int((~valid).sum())
    )
    if not valid.all():
        block_out = _only_valid(block_out, valid)
    return block_out


def _div100(a: np.ndarray) -> np.ndarray:
    return np.sign(a) * (np.abs(a) // 100)


def _only_valid(b: PointBlock, valid: np.ndarray) -> PointBlock:
    lengths = np.diff(b.offsets)
    tag_keep = np.repeat(valid, lengths)
    offsets = np.zeros(int(valid.sum()) + 1, np.int32)
    np.cumsum(lengths[valid], out=offsets[1:])
    mask = pa.array(tag_keep)
    return PointBlock(
        b.ids[valid],
        offsets,
        b.keys.filter(mask),
        b.values.filter(mask),
        b.max_gsd[valid],
        b.lons[valid],
        b.lats[valid],
        b.invalid,
    )


def data_block_parts(
    block: bytes,
) -> tuple[tuple[int, int], dict[str, int], list[tuple[int, int]]]:
    """The string-table span, coordinate settings and primitive-group spans of an OSMData block."""
    strings = (0, 0)
    meta = {"granularity": 100, "lat_offset": 0, "lon_offset": 0}
    groups: list[tuple[int, int]] = []
    for field, value in _fields(block):
        if field == 1:
            strings = value
        elif field == 2:
            groups.append(value)
        elif field == 17:
            meta["granularity"] = value
        elif field == 19:
            meta["lat_offset"] = _signed(value)
        elif field == 20:
            meta["lon_offset"] = _signed(value)
    return strings, meta, groups


def judge_tags(
    judge: _Judge, table: StringTable, kidx: np.ndarray, vidx: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, max GSDs) of the groundable tags among a block's (key, value) index pairs.

    Each distinct candidate string pair of the block is judged once; None when none is kept.
    """
    if kidx.max(initial=0) >= len(table) or vidx.max(initial=0) >= len(table):
        raise Unsupported("a string index past the string table")
    used = np.unique(kidx).tolist()
    candidate = np.zeros(len(table), bool)
    candidate[used] = [judge.is_candidate(table[k]) for k in used]
    cand = np.flatnonzero(candidate[kidx])
    if cand.size == 0:
        return None
    width = len(table)
    pairs, inverse = np.unique(kidx[cand] * width + vidx[cand], return_inverse=True)
    verdict = [judge(table[p // width], table[p % width]) for p in pairs.tolist()]
    ok = np.array([v[0] for v in verdict], bool)[inverse]
    gsd = np.array([v[1] for v in verdict], np.float64)[inverse]
    keep = cand[ok]
    if keep.size == 0:
        return None
    return keep, gsd[ok]


def by_owner(owner: np.ndarray) -> np.ndarray:
    """The order of tag entries (given in file order) by owner (node or way, in file order),
    then as the element lists its tags: OSM's order, which SkyScript's captions follow."""
    return np.argsort(owner, kind="stable")


def _signed(value: int) -> int:
    """A protobuf int64 read as an unsigned varint -> its signed value."""
    return value - (1 << 64) if value >= 1 << 63 else value
