"""The fetch stage's outputs: SkyScript's image/meta layout, WebDataset shards, the manifest.

- ``files``: ``images{k}/<key>.jpg`` then ``meta{k}/<key>.pickle`` (k = ``part_of(key)``), each
  written atomically, the JPEG first: a key whose pickle exists has its JPEG.
- ``webdataset``: ``webdataset/part-NNNNN.tar`` per shard with ``<key>.jpg``, ``<key>.json``
  (the meta dict plus provenance) and ``<key>.txt`` (the tags as text, the caption source),
  written atomically when the shard ends.
- ``manifest/part-NNNNN.parquet``: one row per request (docs/architecture.md).

Each writer can ``check`` a key its manifest calls done: one ``stat`` per file (present, and of
the size the manifest recorded), and with ``verify`` also a full decode of the JPEG and a safe
load of the meta.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import tarfile
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import TEMP_SUFFIX, atomic_path, write_parquet_atomic
from ..meta import MetaError, load_meta
from ._quality import QualityError, decode_jpeg

__all__ = [
    "MANIFEST_SCHEMA",
    "ManifestRow",
    "ShardStats",
    "part_of",
    "FilesWriter",
    "WebDatasetWriter",
    "ManifestError",
    "read_manifest",
    "write_manifest",
    "tags_text",
]

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("request_key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("attempts", pa.int32()),
        ("bytes", pa.int64()),
        ("meta_bytes", pa.int64()),
        ("collection", pa.string()),
        ("image_id", pa.string()),
        ("acquisition_time", pa.timestamp("ms", tz="UTC")),
        ("filepath", pa.string()),
        ("block", pa.string()),
    ]
)


@dataclass
class ManifestRow:
    """One manifest row: what became of one request's tile (docs/architecture.md)."""

    key: str  # the file stem (the year of the image used)
    request_key: str  # the request's key (differs from key when a later year was used)
    status: str  # ok, skipped (permanent) or failed (retried by the next run)
    reason: str | None = None
    attempts: int | None = None  # requests spent on the tile's pixels
    bytes: int | None = None  # of the JPEG
    meta_bytes: int | None = None  # of the pickle
    collection: str | None = None
    image_id: str | None = None
    acquisition_time: datetime | None = None
    filepath: str | None = None  # images{k}/<key>.jpg, or webdataset/part-NNNNN.tar#<key>.jpg
    block: str | None = None  # the block request the tile was cut from

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-able data (the time as ISO 8601), for the shard's journal."""
        t = self.acquisition_time
        return {**self.__dict__, "acquisition_time": t.isoformat() if t is not None else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ManifestRow:
        """The inverse of ``to_json`` (also a row read from parquet, as a dict)."""
        values: dict[str, Any] = {name: data.get(name) for name in MANIFEST_SCHEMA.names}
        row = cls(**values)
        if isinstance(row.acquisition_time, str):
            row.acquisition_time = datetime.fromisoformat(row.acquisition_time)
        return row


assert MANIFEST_SCHEMA.names == [f.name for f in dataclasses.fields(ManifestRow)]


@dataclass
class ShardStats:
    """A fetch shard's ``manifest/part-NNNNN.stats.json``, written last: the shard is done."""

    shard: str = ""
    requests_file: str = ""
    positions: list[int] = field(default_factory=list)  # [start, stop) in fetch order
    keys_hash: str = ""  # of the shard's request keys: a changed plan reruns the shard
    encoding: str | None = None  # what the JPEGs' bytes depend on (None: before it was kept)
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    retryable: int = 0
    fetched: int = 0  # tiles fetched by this run of the shard
    pixel_requests: int = 0
    blocks: int = 0
    block_tiles: int = 0
    repaired: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def read(cls, path: Path) -> ShardStats | None:
        """The stats in ``path``; None when there are none, or they cannot be read."""
        try:
            data = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (OSError, ValueError, TypeError, AttributeError):
            return None


def part_of(key: str, parts: int = 6) -> int:
    """The dataset part (2 .. parts+1) of ``key``: a stable hash (CRC-32) of the key."""
    return zlib.crc32(key.encode("utf-8")) % parts + 2


def tags_text(center: Mapping[str, str], surrounding: Sequence[Mapping[str, str]]) -> str:
    """The tags as text: the focus object's ``k=v`` pairs, then one line per neighbour."""
    lines = [", ".join(f"{k}={v}" for k, v in center.items())]
    lines += ["; ".join(", ".join(f"{k}={v}" for k, v in t.items()) for t in surrounding)]
    return "\n".join(lines).rstrip() + "\n"


_TEMP_NUMBER = itertools.count()


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary name beside it, then a rename).

    ``files.atomic_write_bytes`` without its per-file costs, which were a quarter of fetch's
    CPU per tile (a random name from ``mkstemp``, ``mkdir`` and ``chmod``): the folder exists,
    the name is unique to this process and thread, and the umask gives the usual mode. The
    name ends in ``.tmp``, so ``files.remove_temp_files`` clears what a crash leaves.
    """
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_TEMP_NUMBER)}{TEMP_SUFFIX}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class FilesWriter:
    """SkyScript's released layout: ``images{k}/`` and ``meta{k}/``."""

    def __init__(self, out: Path, parts: int, shard_name: str = "") -> None:
        self.out = out
        self.parts = parts
        for k in range(2, parts + 2):
            (out / f"images{k}").mkdir(parents=True, exist_ok=True)
            (out / f"meta{k}").mkdir(parents=True, exist_ok=True)

    def paths(self, key: str) -> tuple[str, str]:
        """Relative paths of the JPEG and the pickle of ``key``."""
        k = part_of(key, self.parts)
        return f"images{k}/{key}.jpg", f"meta{k}/{key}.pickle"

    def check(
        self, key: str, jpeg_bytes: int | None, meta_bytes: int | None, verify: bool = False
    ) -> str | None:
        """What is wrong with the files of a key the manifest calls ``ok`` (with the sizes it
        recorded): ``missing``, ``size`` (not the size recorded), ``corrupt`` (with
        ``verify``), or None. A hot loop of a rerun: one ``stat`` per file."""
        jpg, meta = (self.out / p for p in self.paths(key))
        for path, size in ((jpg, jpeg_bytes), (meta, meta_bytes)):
            try:
                found = os.stat(path).st_size
            except FileNotFoundError:
                return "missing"
            if size is not None and found != size:
                return "size"
        if verify:
            try:
                decode_jpeg(jpg.read_bytes())
                load_meta(meta)
            except (QualityError, MetaError, OSError):
                return "corrupt"
        return None

    def all_present(
        self, keys: Sequence[str], sizes: Sequence[int | None], meta_sizes: Sequence[int | None]
    ) -> bool:
        """Whether every key's JPEG and pickle exist with the recorded sizes (None: any size).

        ``check`` for a whole manifest part at once, the common case of a rerun: one ``stat``
        per file relative to its open folder, no path objects (about 2 us a file)."""
        folders: dict[int, tuple[int, int]] = {}
        try:
            for key, size, meta_size in zip(keys, sizes, meta_sizes, strict=True):
                k = zlib.crc32(key.encode("utf-8")) % self.parts + 2
                fds = folders.get(k)
                if fds is None:
                    fds = folders[k] = (
                        os.open(self.out / f"images{k}", os.O_RDONLY),
                        os.open(self.out / f"meta{k}", os.O_RDONLY),
                    )
                jpg = os.stat(key + ".jpg", dir_fd=fds[0]).st_size
                meta = os.stat(key + ".pickle", dir_fd=fds[1]).st_size
                if (size is not None and jpg != size) or (
                    meta_size is not None and meta != meta_size
                ):
                    return False
        except FileNotFoundError:
            return False
        finally:
            for fds in folders.values():
                for fd in fds:
                    os.close(fd)
        return True

    def write(self, key: str, jpeg: bytes, meta: bytes, info: dict[str, Any]) -> str:
        """Write the JPEG, then the pickle; return the JPEG's relative path."""
        jpg, pickle_path = self.paths(key)
        _write_file(self.out / jpg, jpeg)
        _write_file(self.out / pickle_path, meta)
        return jpg

    def finish(self, shard_name: str, keep: Sequence[str]) -> None:
        """Nothing to do: every file is already in place."""


class WebDatasetWriter:
    """One tar per shard, written when the shard ends."""

    def __init__(self, out: Path, parts: int, shard_name: str) -> None:
        self.out = out
        (out / "webdataset").mkdir(parents=True, exist_ok=True)
        self._members: dict[str, list[tuple[str, bytes]]] = {}
        self._lock = threading.Lock()
        self._shard = shard_name
        self._old: dict[str, int] | None = None  # member name -> size, of the existing tar

    def tar_name(self, shard_name: str) -> str:
        return f"webdataset/{shard_name}.tar"

    def check(
        self, key: str, jpeg_bytes: int | None, meta_bytes: int | None, verify: bool = False
    ) -> str | None:
        """What is wrong with a key the manifest calls done (see ``FilesWriter.check``): its
        members in this shard's tar, their size, and with ``verify`` their content."""
        tar = self.out / self.tar_name(self._shard)
        with self._lock:
            if self._old is None:
                self._old = {}
                try:
                    with tarfile.open(tar) as tf:
                        self._old = {m.name: m.size for m in tf.getmembers()}
                except (OSError, tarfile.TarError):
                    pass  # no tar, or a damaged one: every key is missing
        size = self._old.get(f"{key}.jpg")
        if size is None or f"{key}.json" not in self._old:
            return "missing"
        if jpeg_bytes is not None and size != jpeg_bytes:
            return "size"
        if verify:
            try:
                with tarfile.open(tar) as tf:
                    decode_jpeg(_member(tf, f"{key}.jpg"))
                    json.loads(_member(tf, f"{key}.json"))
            except (OSError, tarfile.TarError, QualityError, ValueError, KeyError):
                return "corrupt"
        return None

    def write(self, key: str, jpeg: bytes, meta: bytes, info: dict[str, Any]) -> str:
        text = tags_text(info["center_tags"], info["surrounding_tags"])
        members = [
            (f"{key}.jpg", jpeg),
            (f"{key}.json", json.dumps(info, sort_keys=True, default=str).encode("utf-8")),
            (f"{key}.txt", text.encode("utf-8")),
        ]
        with self._lock:
            self._members[key] = members
        return f"{self.tar_name(self._shard)}#{key}.jpg"

    def finish(self, shard_name: str, keep: Sequence[str]) -> None:
        """Write the shard's tar: the kept keys of an earlier tar plus the new ones, in order."""
        path = self.out / self.tar_name(shard_name)
        old: dict[str, list[tuple[str, bytes]]] = {}
        if path.exists():
            with tarfile.open(path) as tf:
                for member in tf.getmembers():
                    f = tf.extractfile(member)
                    if f is not None:
                        old.setdefault(member.name.rsplit(".", 1)[0], []).append(
                            (member.name, f.read())
                        )
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for key in keep:
                for name, data in self._members.get(key) or old.get(key, []):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    tf.addfile(info, io.BytesIO(data))
        with self._lock:
            self._members.clear()


def _member(tf: tarfile.TarFile, name: str) -> bytes:
    f = tf.extractfile(name)
    if f is None:
        raise KeyError(name)
    return f.read()


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> None:
    """Write manifest rows (in order) to ``path`` atomically."""
    columns = {name: [getattr(row, name) for row in rows] for name in MANIFEST_SCHEMA.names}
    write_parquet_atomic(pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA), path)


def read_manifest(path: Path) -> list[ManifestRow]:
    """The rows of a manifest part ([] when it does not exist); raises ``ManifestError`` when
    the part cannot be read."""
    if not path.exists():
        return []
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ManifestError(f"{path}: unreadable manifest part ({type(e).__name__})") from None
    return [ManifestRow.from_json(row) for row in rows]


class ManifestError(ValueError):
    """A manifest part (or its journal) that cannot be read."""
