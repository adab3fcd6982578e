"""``scores.parquet``: the scores a rerun reuses, and the per-shard parts of a running pass.

One row per (filepath, model, pretrained identity, precision, caption hash), with the image's
size and mtime (ns) when it was scored: a score is reused only while the image, its caption,
the weights and the precision are all unchanged. Each finished shard of a scoring pass is one
file ``scores.parts/part-<shard>.parquet`` (written atomically: the shard's "done" mark); the
next run or the end of this one folds the parts into ``scores.parquet``.

An unreadable ``scores.parquet`` (or part) is reported in one line and its rows scored again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import remove_temp_files, write_parquet_atomic

__all__ = [
    "SCORES_FILE",
    "PARTS_DIR",
    "SCHEMA",
    "KEY",
    "caption_hash",
    "read_parts",
    "write_part",
    "read_store",
    "write_store",
    "stat_images",
]

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
PARTS_DIR = "scores.parts"
SCHEMA = pa.schema(
    [
        ("filepath", pa.string()),
        ("similarity", pa.float32()),
        ("model", pa.string()),
        ("pretrained", pa.string()),
        ("precision", pa.string()),
        ("caption_hash", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)
KEY = ["filepath", "model", "pretrained", "precision", "caption_hash"]


def caption_hash(text: str) -> str:
    """A short hash of the caption a score was computed with (a new caption is re-scored)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _empty() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas()


def _read(path: Path) -> pd.DataFrame | None:
    """One scores file in today's schema (columns an older version lacked are null)."""
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning(
            "%s: unreadable (%s); its images are scored again", path, " ".join(str(e).split())
        )
        return None
    missing = [f for f in SCHEMA if f.name not in table.column_names]
    for f in missing:
        table = table.append_column(f, pa.nulls(len(table), f.type))
    try:
        return table.select(SCHEMA.names).cast(SCHEMA).to_pandas()
    except (ValueError, pa.ArrowException) as e:
        log.warning("%s: not a scores file (%s); its images are scored again", path, e)
        return None


def read_parts(out: Path) -> pd.DataFrame:
    """The readable parts under ``out/scores.parts`` (each a finished shard)."""
    parts = out / PARTS_DIR
    frames = []
    if parts.is_dir():
        for part in sorted(parts.glob("part-*.parquet")):
            df = _read(part)
            if df is not None:
                frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else _empty()


def write_part(out: Path, shard: int, df: pd.DataFrame) -> None:
    """A finished shard's scores, atomically (its presence marks the shard done)."""
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    write_parquet_atomic(table, parts / f"part-{shard:06d}.parquet")


def _combine(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty()
    df = pd.concat(frames, ignore_index=True).drop_duplicates(KEY, keep="last")
    return df.sort_values(KEY, kind="stable").reset_index(drop=True)


def read_store(out: Path) -> tuple[pd.DataFrame, bool]:
    """Every score under ``out``: ``scores.parquet`` plus the parts a stopped run left.

    Returns ``(rows, stale)``: ``stale`` when the files should be rewritten by
    ``write_store`` (there are parts to fold in, or the store is unreadable).
    """
    path = out / SCORES_FILE
    stored = _read(path) if path.exists() else _empty()
    parts_dir = out / PARTS_DIR
    has_parts = parts_dir.is_dir() and any(parts_dir.glob("part-*.parquet"))
    rows = _combine([_empty() if stored is None else stored, read_parts(out)])
    return rows, stored is None or has_parts


def write_store(out: Path, rows: pd.DataFrame, *, add_parts: bool = True) -> pd.DataFrame:
    """Write ``rows`` (plus the parts under ``out``) as ``scores.parquet``; remove the parts.

    ``add_parts=False`` when ``rows`` came from ``read_store`` and so hold them already.
    """
    if add_parts:
        rows = _combine([rows, read_parts(out)])
    table = pa.Table.from_pandas(rows, schema=SCHEMA, preserve_index=False)
    write_parquet_atomic(table, out / SCORES_FILE)
    parts_dir = out / PARTS_DIR
    if parts_dir.is_dir():
        for part in parts_dir.glob("part-*.parquet"):
            part.unlink()
        remove_temp_files(parts_dir)
        if not any(parts_dir.iterdir()):
            parts_dir.rmdir()
    return rows


def stat_images(root: Path, filepaths: Sequence[str], threads: int = 16) -> np.ndarray:
    """``(n, 2)`` int64 array of each image's size and mtime in ns; ``-1`` where it is missing.

    One ``stat`` per file, on threads (a network disk answers many at once).
    """
    out = np.full((len(filepaths), 2), -1, dtype=np.int64)
    step = 4096

    def chunk(start: int) -> None:
        for i in range(start, min(start + step, len(filepaths))):
            try:
                st = os.stat(root / filepaths[i])
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[i] = (st.st_size, st.st_mtime_ns)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(chunk, range(0, len(filepaths), step)))
    return out
