"""Atomic writes and shard markers shared by every stage.

A file appears under its final name only once it is complete: it is written under a temporary
name in the same folder, flushed, then renamed. A shard is finished when its stats file (written
last) exists; a rerun skips finished shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json_atomic",
    "write_parquet_atomic",
    "remove_temp_files",
    "TEMP_SUFFIX",
]

TEMP_SUFFIX = ".tmp"
# mkstemp creates files readable by the owner only; finished files get the usual mode.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    The temporary name ends in ``.tmp`` (``remove_temp_files`` cleans leftovers of a crash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(table: Any, path: str | Path) -> None:
    """Write a pyarrow Table (or a GeoDataFrame, via ``to_parquet``) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if hasattr(table, "to_parquet"):
            table.to_parquet(tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)


def remove_temp_files(folder: str | Path) -> int:
    """Delete temporary files a crashed run left under ``folder``; return how many."""
    count = 0
    folder = Path(folder)
    if not folder.exists():
        return 0
    for tmp in folder.rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            count += 1
    return count
