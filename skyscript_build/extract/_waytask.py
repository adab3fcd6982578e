"""The second pass over an input: the blobs with ways, split into tasks (``WayTask``).

Each way task reads the node stores of every node task (``_nodestore``) and writes, for its
own ways: lines (``part-1-WWWWW-*``), areas from closed ways (``part-2-WWWWW-*``, assembled by
osmium from the ways with their locations), and the member ways of candidate relations with
their locations (``side-WWWWW.*`` in the work folder) for the relation tasks.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tag_filters import load_tag_filter

from ..files import atomic_path
from ._areas import MemberSet, assemble_way_areas
from ._dense import TagJudge
from ._encode import AREA_STRINGS, way_blocks
from ._nodestore import NodeStore, save_array
from ._parquet import PartWriter, area_geometries, columns_to_table, remove_parts
from ._pbf import (
    WAYS,
    StringTable,
    Unsupported,
    data_block_parts,
    decompress,
    group_kind,
    read_blob,
)
from ._records import WayStats
from ._ways import (
    WayBuilder,
    WayGroup,
    concat_columns,
    decode_way_group,
    decode_with_osmium,
    rows_table,
    take_rows,
)

__all__ = ["WayTask", "way_task"]

#: Candidate ways handed to osmium's area assembly at a time.
AREA_BATCH = 20_000


@dataclass(frozen=True)
class WayTask:
    """Blobs ``blobs`` ((offset, size) each) of an input that hold ways, with the node stores
    and relation member lists of its node tasks: picklable for a worker."""

    name: str
    input: str
    index: int
    blobs: tuple[tuple[int, int], ...]
    stores: tuple[dict[str, Any], ...]
    members: tuple[dict[str, Any], ...]
    out_dir: str
    work_dir: str
    tag_filter: str
    rows_per_part: int
    batch_rows: int


def _groups(raw: bytes) -> list[WayGroup]:
    """The way groups of a raw blob, in bulk or else through pyosmium."""
    try:
        block = decompress(raw)
        strings, _, groups = data_block_parts(block)
        table: StringTable | None = None
        found = []
        for group in groups:
            if group_kind(block, group)[0] != WAYS:
                continue
            if table is None:
                table = StringTable.of_block(block, strings)
            g = decode_way_group(block, group, table)
            if g is not None:
                found.append(g)
        return found
    except Unsupported:
        g = decode_with_osmium(raw)
        return [g] if g is not None else []


class _Areas:
    """Area candidates gathered as way messages, assembled by osmium in batches."""

    def __init__(self, writer: PartWriter, dropped: Counter) -> None:
        self.writer, self.dropped = writer, dropped
        self.blocks: list[bytes] = []
        self.columns: list[dict[str, Any]] = []
        self.pending = self.made = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray, columns: dict[str, Any]) -> None:
        self.blocks += way_blocks(flat, lengths, AREA_STRINGS)
        self.columns.append(columns)
        self.pending += lengths.size
        if self.pending >= AREA_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.blocks:
            return
        ids, hexes = assemble_way_areas(self.blocks)
        candidates = concat_columns(self.columns)
        self.blocks, self.columns, self.pending = [], [], 0
        self.made += ids.size
        if ids.size == 0:
            return
        order = np.argsort(candidates["ids"], kind="stable")
        rows = order[np.searchsorted(candidates["ids"], ids, sorter=order)]
        columns = take_rows(candidates, rows)
        wkb, bbox, keep = area_geometries(hexes, self.dropped)
        table = rows_table({**columns, "wkb": wkb, "bbox": bbox}, columns_to_table, "a")
        self.writer.write(table.filter(pa.array(keep)) if not keep.all() else table)


class _Side:
    """Member ways with their locations, appended to ``side-WWWWW.bin`` (and its index)."""

    def __init__(self, work: Path, index: int) -> None:
        self.data_path = work / f"side-{index:05d}.bin"
        self.index_path = work / f"side-{index:05d}.index.npy"
        self._ctx: Any = None
        self._file: Any = None
        self.ids: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []

    def add(self, flat: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> None:
        if self._file is None:
            self._ctx = atomic_path(self.data_path)
            self._file = open(self._ctx.__enter__(), "wb")  # noqa: SIM115
        self._file.write(flat.tobytes())
        self.ids.append(ids)
        self.sizes.append(lengths)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            err = RuntimeError("aborted")
            self._ctx.__exit__(type(err), err, None)

    def close(self) -> dict[str, Any] | None:
        if self._file is None:
            return None
        self._file.close()
        self._ctx.__exit__(None, None, None)
        ids = np.concatenate(self.ids)
        sizes = np.concatenate(self.sizes)
        index = np.stack([ids, np.cumsum(sizes) - sizes, sizes], axis=1).astype(np.int64)
        index = index[np.argsort(ids, kind="stable")]
        return {
            "data": str(self.data_path),
            "index": save_array(self.index_path, index),
            "min": int(index[0, 0]),
            "max": int(index[-1, 0]),
        }


def way_task(task: WayTask) -> WayStats:
    """Run one way task (see the module); what it wrote, or ``error``."""
    tf = load_tag_filter(task.tag_filter)
    out, work = Path(task.out_dir), Path(task.work_dir)
    counts: Counter = Counter()
    dropped: Counter = Counter()
    build = WayBuilder(
        TagJudge(tf),
        NodeStore(list(task.stores)),
        MemberSet(list(task.members)).contains,
        counts,
        dropped,
    )
    lines_prefix, areas_prefix = f"1-{task.index:05d}", f"2-{task.index:05d}"
    remove_parts(out, lines_prefix)
    remove_parts(out, areas_prefix)
    lines = PartWriter(out, lines_prefix, task.rows_per_part)
    areas = _Areas(PartWriter(out, areas_prefix, task.rows_per_part), dropped)
    side = _Side(work, task.index)
    pending: list[dict] = []
    rows = 0
    with open(task.input, "rb") as f:
        for offset, size in task.blobs:
            try:
                groups = _groups(read_blob(f, offset, size))
            except (zlib.error, IndexError, ValueError, RuntimeError, OSError) as e:
                lines.abort()
                areas.writer.abort()
                side.abort()
                return WayStats(error=f"corrupt OSM PBF block at byte {offset} ({e})")
            for g in groups:
                got = build(g)
                if got is None:
                    continue
                if got.lines is not None:
                    pending.append(got.lines)
                    rows += got.lines["ids"].size
                if got.areas is not None:
                    areas.add(*got.areas)
                if got.members is not None:
                    side.add(*got.members)
            if rows >= task.batch_rows:
                lines.write(rows_table(concat_columns(pending), columns_to_table))
                pending, rows = [], 0
    if pending:
        lines.write(rows_table(concat_columns(pending), columns_to_table))
    areas.flush()
    broken = counts["expected_way_areas"] - areas.made - dropped["broken_area"]
    if broken > 0:
        dropped["broken_area"] += broken
    return WayStats(
        rows={"w": lines.rows, "a": areas.writer.rows},
        parts=lines.close() + areas.writer.close(),
        dropped=dict(sorted((+dropped).items())),
        side=side.close(),
    )
