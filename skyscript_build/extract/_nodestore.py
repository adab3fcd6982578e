"""Node locations on disk, written by the node tasks and read by every way task.

Each node task writes the locations of its own nodes as one store: a dense table
(``xy[id - first]``, 8 bytes an id, ``MISSING`` for ids it does not hold) where its ids are
dense (a sorted planet or regional extract: most ids in a range are used), else sorted ids
beside their locations (16 bytes a node). Locations are osmium's 1e-7 degree integers.

A way task looks up a block's node references across the stores through memory maps that it
opens for that lookup only, so that the pages it read leave its resident memory with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path

__all__ = ["MISSING", "save_array", "write_npz", "write_store", "NodeStore"]

#: The x of an id a dense table does not hold (no location has it).
MISSING = np.iinfo(np.int32).min


def save_array(path: Path, array: np.ndarray) -> str:
    """``np.save`` under a temporary name, renamed when complete; return the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return str(path)


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    """``np.savez`` under a temporary name, renamed when complete; return the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return str(path)


def write_store(
    folder: Path, name: str, ids: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> dict[str, Any] | None:
    """Write the locations of nodes ``ids`` as ``folder/name.*.npy``; return the store's
    description (JSON-able), or None without nodes. A repeated id keeps its first location."""
    if ids.size == 0:
        return None
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        order = np.argsort(ids, kind="stable")
        ids, xs, ys = ids[order], xs[order], ys[order]
        first = np.ones(ids.size, bool)
        first[1:] = ids[1:] != ids[:-1]
        ids, xs, ys = ids[first], xs[first], ys[first]
    low, high = int(ids[0]), int(ids[-1])
    info: dict[str, Any] = {"min": low, "max": high, "count": int(ids.size), "ids": None}
    span = high - low + 1
    if span <= 2 * ids.size:
        xy = np.full((span, 2), MISSING, np.int32)
        xy[ids - low, 0] = xs
        xy[ids - low, 1] = ys
    else:
        xy = np.stack([xs, ys], axis=1).astype(np.int32)
        info["ids"] = save_array(folder / f"{name}.ids.npy", ids.astype(np.int64))
    info["xy"] = save_array(folder / f"{name}.xy.npy", xy)
    return info


class NodeStore:
    """Every node store of an input, for lookups of node references."""

    def __init__(self, stores: list[dict[str, Any]]) -> None:
        self.stores = sorted(stores, key=lambda s: s["min"])
        self.low = np.array([s["min"] for s in self.stores], np.int64)
        self.high = np.array([s["max"] for s in self.stores], np.int64)

    def lookup(self, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, x, y) of node ids ``refs`` (x and y are 0 where not found)."""
        found = np.zeros(refs.size, bool)
        x = np.zeros(refs.size, np.int32)
        y = np.zeros(refs.size, np.int32)
        if refs.size == 0 or not self.stores:
            return found, x, y
        lo, hi = refs.min(), refs.max()
        for i in np.flatnonzero((self.low <= hi) & (self.high >= lo)).tolist():
            store = self.stores[i]
            where = np.flatnonzero((refs >= store["min"]) & (refs <= store["max"]) & ~found)
            if where.size == 0:
                continue
            want = refs[where]
            # Maps opened for this lookup only: their pages leave this process with them.
            xy = np.load(store["xy"], mmap_mode="r")
            if store["ids"] is None:
                got = np.asarray(xy[want - store["min"]])
                ok = got[:, 0] != MISSING
            else:
                ids = np.load(store["ids"], mmap_mode="r")
                at = np.searchsorted(ids, want)
                at[at >= ids.size] = ids.size - 1
                ok = np.asarray(ids[at]) == want
                got = np.asarray(xy[at])
                del ids
            del xy
            hit = where[ok]
            found[hit] = True
            x[hit] = got[ok, 0]
            y[hit] = got[ok, 1]
        return found, x, y
