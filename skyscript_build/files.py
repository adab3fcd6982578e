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

from .errors import ConfigError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json_atomic",
    "write_parquet_atomic",
    "remove_temp_files",
    "TEMP_SUFFIX",
    "check_out_dir",
    "check_out_file",
    "leave_no_empty_folders",
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


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_problem(folder: Path) -> str | None:
    """Why folder ``folder`` cannot be used or made, or None."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        return "is a file, not a folder" if base == folder else f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable"
    return None


def check_out_dir(path: str | Path, what: str = "--out") -> None:
    """Check, before any work, that folder ``path`` exists or can be made there.

    Raises ``ConfigError`` naming ``what`` and the path when it is a file, lies under a file,
    or lies in a folder this process may not write in.
    """
    problem = _folder_problem(Path(path))
    if problem:
        raise ConfigError(f"{what} {path}: {problem}")


def check_out_file(path: str | Path, what: str = "--out") -> None:
    """Check, before any work, that file ``path`` can be written there (it is no folder, and
    its folder exists or can be made)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder; give a file name")
    problem = _folder_problem(path.parent)
    if problem:
        where = path.parent if problem.startswith("is a") else ""
        raise ConfigError(f"{what} {path}: {where}{' ' if where else ''}{problem}")


def _folders_below(root: Path, depth: int) -> set[Path]:
    found: set[Path] = set()
    level = [root]
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            try:
                with os.scandir(folder) as it:
                    below += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        found.update(below)
        level = below
    return found


@contextlib.contextmanager
def leave_no_empty_folders(*folders: str | Path, depth: int = 0) -> Iterator[None]:
    """When the block fails, remove the folders it made and left empty.

    Watched: each of ``folders``, the parents of it that did not exist, and the folders up to
    ``depth`` levels below it (listed before and after the block: keep ``depth`` small where a
    level holds millions of files). Folders that existed before, or hold anything, are kept;
    so is whatever the block wrote (a failed run's finished shards are progress).
    """
    roots = [Path(f).absolute() for f in folders]
    before: set[Path] = set()
    for root in roots:
        before.add(_nearest_existing(root))
        before.update(_folders_below(root, depth))
    try:
        yield
    except BaseException:
        made: set[Path] = set()
        for root in roots:
            for folder in (root, *root.parents):
                if folder in before or folder == folder.parent:
                    break
                made.add(folder)
            made.update(_folders_below(root, depth) - before)
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty, or gone: keep it
                folder.rmdir()
        raise
