"""Selecting the splits: val and test first (seeded), then the top fractions of the rest.

Rules (documented in the CLI help and docs/architecture.md):

- Rows are put in filepath order before anything random happens, so the input CSV's order
  never matters.
- ``random``: rows are ordered by a seeded hash of their filepath (``seeded_order``); the first
  ``val_size`` are val, the next ``test_size`` test, the rest is the train pool. A row's place
  depends only on its own filepath and the seed, so when the dataset grows the old rows mostly
  keep their split.
- ``geo``: rows are grouped by grid cell (the centre of the meta ``box`` floored to
  ``cell_size`` degrees); the cells, ordered by a seeded hash of their name, fill val until it
  has at least
  ``val_size`` rows, then test likewise, and the rest is the pool. Whole cells stay in one split,
  so val and test can exceed their sizes by less than one cell. Rows without a readable meta file
  go to the pool only (never to val or test).
- Top fraction ``f`` of a pool of ``m`` rows keeps ``k = round_half_up(f * m)`` rows (computed in
  exact decimal) with the highest similarity; ties are broken by filepath (ascending). This is
  DataComp's global quantile with an exact count. Every output is sorted by filepath.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ..meta import MetaError, load_meta

__all__ = [
    "top_count",
    "top_label",
    "size_label",
    "split_random",
    "split_geo",
    "grid_cells",
    "select_top",
    "seeded_order",
]

log = logging.getLogger(__name__)


def top_count(fraction: float, m: int) -> int:
    """Rows kept by a top ``fraction`` of ``m``: round half up of ``fraction * m``, exactly."""
    k = (Decimal(repr(fraction)) * m).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return min(m, int(k))


def top_label(fraction: float) -> str:
    """``0.3`` -> ``top30pct``; ``0.125`` -> ``top12.5pct``."""
    pct = (Decimal(repr(fraction)) * 100).normalize()
    text = format(pct, "f")
    return f"top{text}pct"


def size_label(size: int) -> str:
    """``5000`` -> ``5K``, ``30000`` -> ``30K``, ``2000000`` -> ``2M``, ``200`` -> ``200``."""
    if size and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size and size % 1000 == 0:
        return f"{size // 1000}K"
    return str(size)


def seeded_order(names: Sequence[str], seed: int) -> np.ndarray:
    """Indices of ``names`` ordered by a seeded 64-bit BLAKE2b hash of each name (then name)."""
    salt = str(seed).encode("utf-8")
    keys = [
        hashlib.blake2b(n.encode("utf-8"), digest_size=8, key=salt[:64]).hexdigest() for n in names
    ]
    return np.array(sorted(range(len(names)), key=lambda i: (keys[i], names[i])), dtype=np.int64)


def split_random(
    filepaths: Sequence[str], val_size: int, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (val, test, pool) into ``filepaths``, each sorted."""
    order = seeded_order(filepaths, seed)
    return (
        np.sort(order[:val_size]),
        np.sort(order[val_size : val_size + test_size]),
        np.sort(order[val_size + test_size :]),
    )


def _meta_path(root: Path, filepath: str) -> Path | None:
    p = PurePosixPath(filepath)
    if len(p.parts) < 2 or not p.parts[-2].startswith("images"):
        return None
    folder = "meta" + p.parts[-2][len("images") :]
    return root.joinpath(*p.parts[:-2], folder, p.stem + ".pickle")


def grid_cells(root: Path, filepaths: Sequence[str], cell_size: float) -> list[str | None]:
    """The grid cell (``"ix,iy"``) of each row from its meta box centre; None when unreadable."""
    cells: list[str | None] = []
    for fp in filepaths:
        path = _meta_path(root, fp)
        if path is None:
            cells.append(None)
            continue
        try:
            west, south, east, north = (float(v) for v in load_meta(str(path))["box"])
        except (OSError, MetaError, TypeError, ValueError):
            cells.append(None)
            continue
        lon, lat = (west + east) / 2, (south + north) / 2
        cells.append(f"{math.floor(lon / cell_size)},{math.floor(lat / cell_size)}")
    return cells


def split_geo(
    cells: Sequence[str | None], val_size: int, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (val, test, pool), keeping each grid cell in one split."""
    by_cell: dict[str, list[int]] = {}
    no_cell: list[int] = []
    for i, cell in enumerate(cells):
        if cell is None:
            no_cell.append(i)
        else:
            by_cell.setdefault(cell, []).append(i)
    if no_cell:
        log.warning("%d rows have no readable meta box: they go to train only", len(no_cell))
    names = sorted(by_cell)
    order = seeded_order(names, seed)
    val: list[int] = []
    test: list[int] = []
    pool: list[int] = list(no_cell)
    for j in order:
        members = by_cell[names[j]]
        if len(val) < val_size:
            val.extend(members)
        elif len(test) < test_size:
            test.extend(members)
        else:
            pool.extend(members)
    return (
        np.sort(np.array(val, dtype=np.int64)),
        np.sort(np.array(test, dtype=np.int64)),
        np.sort(np.array(pool, dtype=np.int64)),
    )


def select_top(pool: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The top ``fraction`` of ``pool`` by ``similarity`` (ties by filepath), in filepath order."""
    k = top_count(fraction, len(pool))
    ranked = pool.sort_values(["similarity", "filepath"], ascending=[False, True], kind="stable")
    return ranked.head(k).sort_values("filepath", kind="stable")
