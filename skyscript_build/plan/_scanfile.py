"""The scan file: a plan scan task's objects as raw columns, read back by row ranges.

Pass 2's partitions each read a few row ranges from every scan file. A memory map would let
the kernel map far more of each file than the rows asked for (large page-cache folios), so
the reader uses plain positioned reads (``os.pread``) of exactly the bytes of those rows:
a partition holds its own rows, never a share of every file.

Layout: 8 bytes (little-endian length of the header), a JSON header (``rows``, ``entries`` and,
per column, its dtype, byte offset and length in items), then each column's bytes, 64-byte
aligned. Columns hold one item per row (``ROW_COLUMNS``), one per tag entry plus one
(``tag_start``: each row's first entry; ``key_start``/``value_start``: each entry's first byte
in ``key_bytes``/``value_bytes``), or one per ``INDEX_STEP`` rows (``key_index``: every
``INDEX_STEP``-th key, so that a range's rows are found reading a little of ``key``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..files import atomic_path

#: Every INDEX_STEP-th key is kept in the index.
INDEX_STEP = 1024
ROW_COLUMNS = {
    "key": "<i8",
    "kind": "<i1",
    "element": "<i1",
    "osm_id": "<i8",
    "west": "<f8",
    "south": "<f8",
    "east": "<f8",
    "north": "<f8",
    "max_gsd": "<f8",
    "visible": "<f8",
    "src": "<i2",
    "epsg": "<i4",
    "pixels": "<i4",
}


@dataclass
class Rows:
    """Rows of scan files: per-row columns (``ROW_COLUMNS``), and the tags as arrow strings with
    per-row offsets into them."""

    columns: dict[str, np.ndarray]
    tag_offsets: np.ndarray
    tag_keys: pa.Array
    tag_values: pa.Array
    tag_gsd: np.ndarray

    def __len__(self) -> int:
        return len(self.columns["key"])


def _strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets from 0, uint8 bytes) of a string array."""
    arr = pa.concat_arrays([arr.cast(pa.large_string())])  # fresh: offsets start at 0
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, raw[: int(offsets[-1])]


def write_scan_file(path: Path, rows: Rows) -> None:
    """Write ``rows`` (sorted by ``key``) to ``path`` atomically."""
    key_start, key_bytes = _strings(rows.tag_keys)
    value_start, value_bytes = _strings(rows.tag_values)
    arrays = {
        **{
            name: np.ascontiguousarray(rows.columns[name], dtype=dt)
            for name, dt in ROW_COLUMNS.items()
        },
        "tag_start": rows.tag_offsets.astype("<i8"),
        "tag_gsd": rows.tag_gsd.astype("<f8"),
        "key_start": key_start.astype("<i8"),
        "value_start": value_start.astype("<i8"),
        "key_bytes": key_bytes,
        "value_bytes": value_bytes,
        "key_index": np.ascontiguousarray(rows.columns["key"][::INDEX_STEP], dtype="<i8"),
    }
    header: dict = {"rows": len(rows), "entries": len(rows.tag_gsd), "columns": {}}
    offset = 0
    for name, a in arrays.items():
        header["columns"][name] = {"dtype": a.dtype.str, "offset": offset, "count": len(a)}
        offset += -(-a.nbytes // 64) * 64
    head = json.dumps(header).encode()
    start = -(-(8 + len(head)) // 64) * 64
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, a in arrays.items():
            f.seek(start + header["columns"][name]["offset"])
            f.write(a.tobytes())
        f.truncate(start + offset)


class ScanFile:
    """One scan file, open for positioned reads."""

    def __init__(self, path: str | Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header = json.loads(os.pread(self.fd, length, 8))
        self.start = -(-(8 + length) // 64) * 64
        self.rows = int(self.header["rows"])
        self.index = self.read("key_index", 0, self.header["columns"]["key_index"]["count"])

    def close(self) -> None:
        os.close(self.fd)

    def read(self, name: str, first: int, stop: int) -> np.ndarray:
        """Items ``first:stop`` of column ``name``."""
        col = self.header["columns"][name]
        dtype = np.dtype(col["dtype"])
        count = max(0, stop - first)
        if count == 0:
            return np.zeros(0, dtype=dtype)
        data = os.pread(
            self.fd, count * dtype.itemsize, self.start + col["offset"] + first * dtype.itemsize
        )
        return np.frombuffer(data, dtype=dtype)

    def find(self, lo: int, hi: int) -> tuple[int, int]:
        """The rows [a, b) whose key is in [lo, hi)."""
        return self._first_at_least(lo), self._first_at_least(hi)

    def _first_at_least(self, key: int) -> int:
        block = int(np.searchsorted(self.index, key, side="left")) - 1
        if block < 0:
            return 0
        first = block * INDEX_STEP
        keys = self.read("key", first, min(self.rows, first + INDEX_STEP + 1))
        return first + int(np.searchsorted(keys, key, side="left"))

    def rows_between(self, a: int, b: int) -> Rows:
        """Rows [a, b), every column."""
        columns = {name: self.read(name, a, b) for name in ROW_COLUMNS}
        tag_start = self.read("tag_start", a, b + 1)
        e0, e1 = (int(tag_start[0]), int(tag_start[-1])) if len(tag_start) else (0, 0)
        return Rows(
            columns=columns,
            tag_offsets=tag_start - e0,
            tag_keys=self._strings("key", e0, e1),
            tag_values=self._strings("value", e0, e1),
            tag_gsd=self.read("tag_gsd", e0, e1),
        )

    def _strings(self, which: str, e0: int, e1: int) -> pa.Array:
        starts = self.read(f"{which}_start", e0, e1 + 1)
        if len(starts) == 0:
            return pa.array([], pa.string())
        raw = self.read(f"{which}_bytes", int(starts[0]), int(starts[-1]))
        offsets = (starts - starts[0]).astype(np.int64)
        return pa.LargeStringArray.from_buffers(
            len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(raw)
        ).cast(pa.string())


def concat_rows(pieces: list[Rows]) -> Rows:
    """One ``Rows`` of several, in order."""
    if len(pieces) == 1:
        return pieces[0]
    lengths = [len(p.tag_gsd) for p in pieces]
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    offsets = [pieces[0].tag_offsets[:1]] if pieces else []
    offsets += [p.tag_offsets[1:] + b for p, b in zip(pieces, base, strict=True)]
    return Rows(
        columns={n: np.concatenate([p.columns[n] for p in pieces]) for n in ROW_COLUMNS},
        tag_offsets=np.concatenate(offsets) if offsets else np.zeros(1, np.int64),
        tag_keys=pa.concat_arrays([p.tag_keys for p in pieces]),
        tag_values=pa.concat_arrays([p.tag_values for p in pieces]),
        tag_gsd=np.concatenate([p.tag_gsd for p in pieces]),
    )


def empty_rows() -> Rows:
    """No rows."""
    return Rows(
        columns={n: np.zeros(0, dtype=dt) for n, dt in ROW_COLUMNS.items()},
        tag_offsets=np.zeros(1, np.int64),
        tag_keys=pa.array([], pa.string()),
        tag_values=pa.array([], pa.string()),
        tag_gsd=np.zeros(0),
    )


def take_rows(rows: Rows, idx: np.ndarray) -> Rows:
    """Rows ``idx`` (any order) of ``rows``."""
    from ._geo import ranges

    starts = rows.tag_offsets[idx]
    lengths = rows.tag_offsets[idx + 1] - starts
    entries = ranges(starts, lengths)
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = pa.array(entries, type=pa.int64())
    return Rows(
        columns={n: c[idx] for n, c in rows.columns.items()},
        tag_offsets=offsets,
        tag_keys=rows.tag_keys.take(take),
        tag_values=rows.tag_values.take(take),
        tag_gsd=rows.tag_gsd[entries],
    )
