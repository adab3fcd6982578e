"""Small OSM PBF files written in memory, for osmium's area assembly without a node index.

Ways are written with their node locations (libosmium's ``LocationsOnWays``: packed ``lat`` and
``lon`` fields beside ``refs``), so that osmium assembles areas from them without reading any
node. Messages are encoded in bulk with numpy, a whole group of ways at a time; blobs are
stored uncompressed (``raw``), as the file never leaves the process or the work folder.

A node not found is written at osmium's undefined location (both coordinates 2**31 - 1), which
is what osmium's own location handler leaves on a way whose node is missing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

__all__ = [
    "UNDEFINED",
    "AREA_STRINGS",
    "pbf_file",
    "way_messages",
    "way_blocks",
    "ranges",
]

#: osmium's undefined coordinate.
UNDEFINED = 2**31 - 1
#: Uncompressed size of a block this module writes (osmium accepts up to 32 MiB).
_BLOCK_BYTES = 8 * 2**20
_STRING0 = b"\x0a\x02\x0a\x00"  # a string table holding only the empty string
#: A string table of "", "area", "yes".
AREA_STRINGS = b"\x0a\x00\x0a\x04area\x0a\x03yes"


def _varint(value: int) -> bytes:
    """One varint (a header's length, say: ``varints`` does the bulk)."""
    return varints(np.array([value], np.uint64))[0].tobytes()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned values -> (their varint bytes, concatenated; bytes per value)."""
    v = np.asarray(values, np.uint64)
    length = np.ones(v.size, np.int64)
    for k in range(1, 10):
        length += v >= np.uint64(1) << np.uint64(7 * k)
    out = np.empty(int(length.sum()), np.uint8)
    start = np.cumsum(length) - length
    for k in range(int(length.max(initial=0))):
        has = length > k
        byte = (v[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (length[has] > k + 1).astype(np.uint64) << np.uint64(7)
        out[start[has] + k] = (byte | more).astype(np.uint8)
    return out, length


def _zigzag_deltas(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per message, the zigzag-coded deltas of ``values`` (each message restarts from 0)."""
    v = np.asarray(values, np.int64)
    d = np.empty_like(v)
    if v.size:
        d[0] = v[0]
        d[1:] = v[1:] - v[:-1]
        first = (np.cumsum(counts) - counts)[counts > 0]
        d[first] = v[first]
    return ((d << 1) ^ (d >> 63)).view(np.uint64)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated index ranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


class _Pieces:
    """Byte strings of many messages: ``flat`` holds them one after the other, ``lengths``
    gives each one's size."""

    def __init__(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        self.flat, self.lengths = flat, lengths

    @staticmethod
    def join(parts: list[_Pieces]) -> _Pieces:
        """Message i of the result = message i of every part, one after the other."""
        total = np.sum([p.lengths for p in parts], axis=0)
        out = np.empty(int(total.sum()), np.uint8)
        at = np.cumsum(total) - total
        for p in parts:
            out[ranges(at, p.lengths)] = p.flat
            at = at + p.lengths
        return _Pieces(out, total)

    def prefixed(self, tag: int, keep_empty: bool = True) -> _Pieces:
        """Each message as a length-delimited field ``tag`` (left out where empty unless
        ``keep_empty``)."""
        size_bytes, size_len = varints(self.lengths)
        head_len = np.where(self.lengths > 0, 1 + size_len, 0) if not keep_empty else 1 + size_len
        total = head_len + self.lengths
        out = np.empty(int(total.sum()), np.uint8)
        at = np.cumsum(total) - total
        with_head = head_len > 0
        out[at[with_head]] = tag
        sizes_at = ranges(at[with_head] + 1, size_len[with_head])
        starts = np.cumsum(size_len) - size_len
        out[sizes_at] = size_bytes[ranges(starts[with_head], size_len[with_head])]
        out[ranges(at + head_len, self.lengths)] = self.flat
        return _Pieces(out, total)


def _packed(values: np.ndarray, counts: np.ndarray) -> _Pieces:
    """Per message, ``counts[i]`` values as packed varints."""
    flat, lengths = varints(values)
    owner = np.repeat(np.arange(counts.size), counts)
    return _Pieces(
        flat, np.bincount(owner, weights=lengths, minlength=counts.size).astype(np.int64)
    )


def _id_fields(ids: np.ndarray) -> _Pieces:
    """Per message, field 1 (the id) as a varint."""
    flat, lengths = varints(np.asarray(ids, np.int64).view(np.uint64))
    at = np.cumsum(lengths + 1) - (lengths + 1)
    out = np.empty(flat.size + ids.size, np.uint8)
    out[at] = 0x08
    out[ranges(at + 1, lengths)] = flat
    return _Pieces(out, lengths + 1)


def way_messages(
    ids: np.ndarray,
    refs: np.ndarray,
    ref_counts: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    keys: np.ndarray | None = None,
    values: np.ndarray | None = None,
    tag_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Way messages with their node locations, each wrapped as a group's ``ways`` field.

    ``refs`` (node ids), ``xs``/``ys`` (osmium's 1e-7 degree integers, ``UNDEFINED`` where
    unknown) hold ``ref_counts[i]`` entries for way i; ``keys``/``values`` are string-table
    indices, ``tag_counts[i]`` for way i. Returns (bytes of all messages, bytes per message).
    """
    parts = [_id_fields(ids)]
    if keys is not None and values is not None and tag_counts is not None:
        parts.append(_packed(keys, tag_counts).prefixed(0x12, keep_empty=False))
        parts.append(_packed(values, tag_counts).prefixed(0x1A, keep_empty=False))
    for tag, vals in ((0x42, refs), (0x4A, ys), (0x52, xs)):
        parts.append(_packed(_zigzag_deltas(vals, ref_counts), ref_counts).prefixed(tag, False))
    ways = _Pieces.join(parts).prefixed(0x1A)
    return ways.flat, ways.lengths


def way_blocks(flat: np.ndarray, lengths: np.ndarray, strings: bytes = b"") -> list[bytes]:
    """Wrapped way messages -> PrimitiveBlocks of at most about 8 MiB each.

    ``strings``: the StringTable message the ways' tag indices point into (empty: none).
    """
    table = _field(1, strings) if strings else _STRING0
    blocks = []
    ends = np.cumsum(lengths)
    start = 0
    begin = 0
    while start < lengths.size:
        stop = int(np.searchsorted(ends, begin + _BLOCK_BYTES, side="right"))
        stop = max(stop, start + 1)
        end = int(ends[stop - 1])
        blocks.append(table + _field(2, flat[begin:end].tobytes()))
        start, begin = stop, end
    return blocks


def _blob(kind: bytes, data: bytes) -> bytes:
    blob = _field(1, data) + b"\x10" + _varint(len(data))
    return _framed(kind, blob)


def _framed(kind: bytes, blob: bytes) -> bytes:
    header = _field(1, kind) + b"\x18" + _varint(len(blob))
    return struct.pack(">I", len(header)) + header + blob


_HEADER = _blob(
    b"OSMHeader",
    _field(4, b"OsmSchema-V0.6") + _field(4, b"DenseNodes") + _field(5, b"LocationsOnWays"),
)


def pbf_file(blocks: Sequence[bytes] = (), blobs: Sequence[bytes] = ()) -> bytes:
    """A whole PBF file (in memory) of PrimitiveBlocks ``blocks`` and of ``blobs``: raw Blob
    messages copied from an input file (osmium decompresses them)."""
    return (
        _HEADER
        + b"".join(_framed(b"OSMData", b) for b in blobs)
        + b"".join(_blob(b"OSMData", b) for b in blocks)
    )
