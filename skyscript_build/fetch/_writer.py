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
import io
import itertools
import json
import os
import tarfile
import threading
import zlib
from collections.abc import Mapping, Sequence
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
    "part_of",
    "FilesWriter",
    "WebDatasetWriter",
    "ManifestError",
    "read_manifest",
    "write_manifest",
    "row_to_json",
    "row_from_json",
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

    def check(self, row: Mapping[str, Any], verify: bool = False) -> str | None:
        """What is wrong with the files of a manifest row that says ``ok``: ``missing``,
        ``size`` (not the size recorded), ``corrupt`` (with ``verify``), or None."""
        jpg, meta = (self.out / p for p in self.paths(row["key"]))
        for path, size in ((jpg, row.get("bytes")), (meta, row.get("meta_bytes"))):
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

    def check(self, row: Mapping[str, Any], verify: bool = False) -> str | None:
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
        key = row["key"]
        size = self._old.get(f"{key}.jpg")
        if size is None or f"{key}.json" not in self._old:
            return "missing"
        if row.get("bytes") is not None and size != row["bytes"]:
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


def write_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    """Write manifest rows (in order) to ``path`` atomically."""
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in MANIFEST_SCHEMA.names} for row in rows],
        schema=MANIFEST_SCHEMA,
    )
    write_parquet_atomic(table, path)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The rows of a manifest part ([] when it does not exist); raises ``ManifestError`` when
    the part cannot be read."""
    if not path.exists():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ManifestError(f"{path}: unreadable manifest part ({type(e).__name__})") from None


class ManifestError(ValueError):
    """A manifest part (or its journal) that cannot be read."""


def row_to_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest row as JSON-able data (the time as ISO 8601)."""
    t = row.get("acquisition_time")
    return {**row, "acquisition_time": t.isoformat() if isinstance(t, datetime) else t}


def row_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``row_to_json``."""
    t = data.get("acquisition_time")
    return {
        **{name: data.get(name) for name in MANIFEST_SCHEMA.names},
        "acquisition_time": datetime.fromisoformat(t) if isinstance(t, str) else t,
    }
