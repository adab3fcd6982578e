"""The OSM PBF format, read side: every decoding step of extract lives here.

- The file: ``check_pbf`` walks the blob headers (seeks only, nothing is decompressed),
  checks that the file is a complete OSM PBF and returns where each data blob lies, so that
  the work can be cut into ranges of blobs; ``read_blob`` reads one.
- Protobuf, one field at a time (a blob, a block's header fields, a group's first field):
  ``varint``, ``fields``, ``repeated_field``.
- Protobuf in bulk, with numpy (the many values of a block): ``packed_varints``,
  ``zigzag_delta``, ``Elements`` (every Way or Relation message of a group at once).
- OSM blocks: ``decompress``, ``data_block_parts``, ``group_kind``, ``StringTable``,
  ``dense_nodes`` (a DenseNodes group's ids and locations).

A feature these decoders do not cover (plain ``Node`` groups, zstd or lz4 compression, an
element's fields out of the usual order...) raises ``Unsupported``; the caller then reads that
blob through pyosmium. Which reader runs when: docs/architecture.md, "extract's readers".
The write side (small PBF files for osmium's area assembly) is ``_encode``.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ._encode import ranges

__all__ = [
    "Blobs",
    "check_pbf",
    "read_blob",
    "file_fingerprint",
    "Unsupported",
    "varint",
    "fields",
    "repeated_field",
    "packed_varints",
    "zigzag_delta",
    "Elements",
    "decompress",
    "data_block_parts",
    "group_kind",
    "StringTable",
    "DenseNodes",
    "dense_nodes",
]

_MAX_HEADER = 64 * 1024
_MAX_BLOB = 32 * 1024 * 1024
#: A PrimitiveGroup's fields: what its elements are.
NODES, DENSE_NODES, WAYS, RELATIONS = 1, 2, 3, 4


class Unsupported(Exception):
    """The file uses a PBF feature these decoders do not cover (pyosmium reads it)."""


# --- protobuf, one field at a time ----------------------------------------------------------


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` of ``buf``, and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end of its message")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message; length-delimited values as (start, end)."""
    pos = start
    end = len(buf) if end is None else end
    while pos < end:
        key, pos = varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = varint(buf, pos)
            yield key >> 3, value
        elif wire == 2:
            length, pos = varint(buf, pos)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            yield key >> 3, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise ValueError("a field runs past the end of its message")
            yield key >> 3, buf[pos : pos + size]
            pos += size
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
    while pos < end:  # thousands of strings or ways per block: lengths of one byte inline
        if block[pos] != tag:
            raise Unsupported(what)
        length = block[pos + 1]
        pos += 2
        if length & 0x80:
            length, pos = varint(block, pos - 1)
        spans.append((pos, pos + length))
        pos += length
    return spans


def _signed(value: int) -> int:
    """A protobuf int64 read as an unsigned varint -> its signed value."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --- protobuf in bulk -----------------------------------------------------------------------


def packed_varints(buf: bytes, span: tuple[int, int]) -> np.ndarray:
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


def _unzigzag(values: np.ndarray) -> np.ndarray:
    """Zigzag-coded uint64 values -> int64."""
    return (values >> np.uint64(1)).astype(np.int64) ^ -(values & np.uint64(1)).astype(np.int64)


def zigzag_delta(values: np.ndarray) -> np.ndarray:
    """A packed sint64 field delta-coded over the whole field (DenseNodes) -> int64 values."""
    return np.cumsum(_unzigzag(values))


def _varints_at(raw: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varints starting at ``pos`` (``raw`` padded with 10 zero bytes) -> (values, next pos)."""
    window = raw[pos[:, None] + np.arange(10)]
    length = np.argmax(window < 0x80, axis=1) + 1
    payload = (window & 0x7F).astype(np.uint64) << (7 * np.arange(10, dtype=np.uint64))
    payload[np.arange(10) >= length[:, None]] = 0
    return payload.sum(axis=1, dtype=np.uint64), pos + length


def _packed_many(
    raw: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
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
    return packed_varints(data_bytes, (0, len(data_bytes))), counts


# Way and Relation fields in the order osmium (and most writers) store them: keys, vals, info,
# then refs, lats, lons of a way, or roles, member ids, member types of a relation.
_ELEMENT_FIELDS = ((2, 0x12), (3, 0x1A), (4, 0x22), (8, 0x42), (9, 0x4A), (10, 0x52))


class Elements:
    """The Way (group field 3, ``tag`` 0x1A) or Relation (field 4, 0x22) messages of one
    group, parsed across all of them at once."""

    def __init__(self, block: bytes, group: tuple[int, int], tag: int = 0x1A) -> None:
        spans = repeated_field(block, group, tag, "a group mixing elements of two kinds")
        raw = np.frombuffer(block, np.uint8)
        self.raw = raw = np.concatenate((raw, np.zeros(10, np.uint8)))
        p = np.asarray([s for s, _ in spans], np.int64)
        e = np.asarray([e for _, e in spans], np.int64)
        if (raw[p] != 0x08).any():
            raise Unsupported("an element without its id first")
        ids, p = _varints_at(raw, p + 1)
        self.ids = ids.astype(np.int64)
        self.spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for field, field_tag in _ELEMENT_FIELDS:
            here = (p < e) & (raw[np.minimum(p, raw.size - 1)] == field_tag)
            start = p.copy()
            end = p.copy()
            if here.any():
                length, body = _varints_at(raw, p[here] + 1)
                start[here] = body
                end[here] = body + length.astype(np.int64)
            self.spans[field] = (start, end)
            p = end
        if (p != e).any():
            raise Unsupported("an element field out of the usual order")

    def __len__(self) -> int:
        return self.ids.size

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
        cs = np.cumsum(_unzigzag(raw))
        start = np.cumsum(count) - count
        base = np.where(start > 0, cs[np.maximum(start - 1, 0)], 0)
        return cs - np.repeat(base, count), count

    def packed(self, field: int) -> tuple[np.ndarray, np.ndarray]:
        """A packed varint field of every element -> (all values, per element)."""
        start, end = self.spans[field]
        return _packed_many(self.raw, start, end)


# --- OSM blocks -----------------------------------------------------------------------------


def decompress(blob: bytes) -> bytes:
    """The block of a raw ``Blob`` message (raw, zlib or lzma)."""
    data: bytes | None = None
    for field, value in fields(blob):
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


def data_block_parts(
    block: bytes,
) -> tuple[tuple[int, int], dict[str, int], list[tuple[int, int]]]:
    """The string-table span, coordinate settings and primitive-group spans of an OSMData block."""
    strings = (0, 0)
    meta = {"granularity": 100, "lat_offset": 0, "lon_offset": 0}
    groups: list[tuple[int, int]] = []
    for field, value in fields(block):
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


def group_kind(block: bytes, group: tuple[int, int]) -> tuple[int, Any]:
    """A group's first field (``NODES``, ``DENSE_NODES``, ``WAYS``, ``RELATIONS``; 0 when
    empty) and its value: a group holds elements of one kind."""
    return next(fields(block, *group), (0, None))


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


@dataclass
class DenseNodes:
    """A DenseNodes group: node ids, locations as osmium's 1e-7 degree integers (``x``, ``y``),
    and the span of its ``keys_vals`` field (None: no node has tags)."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    keys_vals: tuple[int, int] | None


def _div100(a: np.ndarray) -> np.ndarray:
    """osmium's ``/ 100`` in C++ integer division (toward zero)."""
    return np.sign(a) * (np.abs(a) // 100)


def dense_nodes(block: bytes, dense: tuple[int, int], meta: dict[str, int]) -> DenseNodes | None:
    """The nodes of the DenseNodes group at ``dense`` (None when it has none)."""
    spans: dict[int, tuple[int, int]] = {}
    for field, value in fields(block, *dense):
        if field in (1, 8, 9, 10):
            spans[field] = value
    if 1 not in spans:
        return None
    ids = zigzag_delta(packed_varints(block, spans[1]))
    lat = zigzag_delta(packed_varints(block, spans[8]))
    lon = zigzag_delta(packed_varints(block, spans[9]))
    if not ids.size == lat.size == lon.size:
        raise Unsupported("DenseNodes fields of different lengths")
    gran = meta["granularity"]
    x = _div100(meta["lon_offset"] + gran * lon)
    y = _div100(meta["lat_offset"] + gran * lat)
    return DenseNodes(ids, x, y, spans.get(10))


# --- the file -------------------------------------------------------------------------------


def _parse_blob_header(buf: bytes) -> tuple[str, int]:
    """(type, datasize) of a BlobHeader protobuf message."""
    kind, size = "", -1
    try:
        for field, value in fields(buf):
            if isinstance(value, bytes):
                raise ValueError("a fixed-size field in a blob header")
            if field == 1 and isinstance(value, tuple):
                kind = buf[value[0] : value[1]].decode("ascii", "replace")
            elif field == 3 and isinstance(value, int):
                size = value
    except Unsupported as e:
        raise ValueError(str(e)) from None
    if size < 0:
        raise ValueError("malformed blob header")
    return kind, size


@dataclass(frozen=True)
class Blobs:
    """Where the blobs of a PBF file lie: the header blob and each data blob, as the file
    offset and size of its ``Blob`` message (what follows the ``BlobHeader``)."""

    header: tuple[int, int]
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return int(self.offsets.size)


def check_pbf(path: str | Path) -> Blobs:
    """Raise ``InputError`` unless ``path`` is a complete OSM PBF file; return its blobs."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "the file is empty (expected an OSM PBF file, .osm.pbf)")
    blobs = 0
    osm_header = (0, 0)
    offsets: list[int] = []
    sizes: list[int] = []
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(4)
            if len(head) < 4:
                raise InputError(path, f"truncated OSM PBF (cut inside a blob at byte {pos})")
            (length,) = struct.unpack(">I", head)
            if length == 0 or length > _MAX_HEADER:
                raise _not_pbf_or_truncated(path, blobs, pos)
            header = f.read(length)
            if len(header) < length:
                raise InputError(path, f"truncated OSM PBF (cut inside a blob at byte {pos})")
            try:
                kind, datasize = _parse_blob_header(header)
            except ValueError:
                raise _not_pbf_or_truncated(path, blobs, pos) from None
            if blobs == 0 and kind != "OSMHeader":
                raise _not_pbf_or_truncated(path, blobs, pos)
            if kind not in ("OSMHeader", "OSMData") or datasize > _MAX_BLOB:
                raise _not_pbf_or_truncated(path, blobs, pos)
            start = pos + 4 + length
            pos = start + datasize
            if pos > size:
                raise InputError(path, f"truncated OSM PBF (the last blob ends past byte {size})")
            if kind == "OSMData":
                offsets.append(start)
                sizes.append(datasize)
            elif blobs == 0:
                osm_header = (start, datasize)
            f.seek(pos)
            blobs += 1
    return Blobs(osm_header, np.array(offsets, np.int64), np.array(sizes, np.int64))


def read_blob(f: BinaryIO, offset: int, size: int) -> bytes:
    """The raw ``Blob`` message at ``offset`` of the open file ``f``."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"corrupt OSM PBF (a blob at byte {offset} is cut short)")
    return data


def _not_pbf_or_truncated(path: Path, blobs: int, pos: int) -> InputError:
    if blobs == 0:
        return InputError(path, "not an OSM PBF file (expected a .osm.pbf file)")
    return InputError(path, f"corrupt OSM PBF (bad blob header at byte {pos})")


def file_fingerprint(path: str | Path) -> dict[str, object]:
    """Size and modification time of ``path``: a changed input invalidates finished work."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a (small) file's content."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
