"""Cheap checks of an input file before any worker starts: it exists, it is an OSM PBF, it is
complete. The PBF check walks the blob headers (seeks only, nothing is decompressed) and
returns where each data blob lies, so that the work can be cut into ranges of blobs."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InputError

__all__ = ["Blobs", "check_pbf", "file_fingerprint", "read_blob"]

_MAX_HEADER = 64 * 1024
_MAX_BLOB = 32 * 1024 * 1024


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint runs past the header")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def _parse_blob_header(buf: bytes) -> tuple[str, int]:
    """(type, datasize) of a BlobHeader protobuf message."""
    pos, kind, size = 0, "", -1
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            if field == 3:
                size = value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if field == 1:
                kind = buf[pos : pos + length].decode("ascii", "replace")
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    if size < 0 or pos != len(buf):
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
