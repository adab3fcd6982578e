"""The fetch stage's outputs: SkyScript's image/meta layout, WebDataset shards, the manifest.

- ``files``: ``images{k}/<key>.jpg`` then ``meta{k}/<key>.pickle`` (k = ``part_of(key)``), each
  written atomically, the JPEG first: a key whose pickle exists has its JPEG.
- ``webdataset``: ``webdataset/part-NNNNN.tar`` per shard with ``<key>.jpg``, ``<key>.json``
  (the meta dict plus provenance) and ``<key>.txt`` (the tags as text, the caption source),
  written atomically when the shard ends.
- ``manifest/part-NNNNN.parquet``: one row per request (docs/architecture.md).
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_path, atomic_write_bytes, write_parquet_atomic

__all__ = [
    "MANIFEST_SCHEMA",
    "part_of",
    "FilesWriter",
    "WebDatasetWriter",
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
        ("collection", pa.string()),
        ("image_id", pa.string()),
        ("acquisition_time", pa.timestamp("ms", tz="UTC")),
        ("filepath", pa.string()),
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

    def done(self, key: str) -> bool:
        """Both files of ``key`` exist."""
        jpg, meta = self.paths(key)
        return (self.out / jpg).exists() and (self.out / meta).exists()

    def write(self, key: str, jpeg: bytes, meta: bytes, info: dict[str, Any]) -> str:
        """Write the JPEG, then the pickle; return the JPEG's relative path."""
        jpg, pickle_path = self.paths(key)
        atomic_write_bytes(self.out / jpg, jpeg)
        atomic_write_bytes(self.out / pickle_path, meta)
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
        self._old: set[str] | None = None

    def tar_name(self, shard_name: str) -> str:
        return f"webdataset/{shard_name}.tar"

    def done(self, key: str) -> bool:
        """``key`` is in this shard's existing tar."""
        if self._old is None:
            tar = self.out / self.tar_name(self._shard)
            self._old = set()
            if tar.exists():
                with tarfile.open(tar) as tf:
                    self._old = {n[: -len(".jpg")] for n in tf.getnames() if n.endswith(".jpg")}
        return key in self._old

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


def write_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    """Write manifest rows (in order) to ``path`` atomically."""
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in MANIFEST_SCHEMA.names} for row in rows],
        schema=MANIFEST_SCHEMA,
    )
    write_parquet_atomic(table, path)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The rows of a manifest part ([] when it does not exist)."""
    if not path.exists():
        return []
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        t = row.get("acquisition_time")
        if isinstance(t, datetime) and t.tzinfo is None:  # pragma: no cover - old pyarrow
            row["acquisition_time"] = t
    return rows
